"""AdapterSet and BatchDecoder on tiny Llamas: a row's result does not depend on its batch, equals lora_ref's own
single-sequence generation with the adapter applied unmerged and the merged model, adapters never leak into each
other's rows, load/unload while rows run, float and NF4 bases, the tied head, and bad input.

Tolerances. A row decoded alone runs the same products as lora_ref's LoraLinear forward except the low-rank term,
which the Numba kernel sums in its own order (``impl="numpy"`` gives the LoraLinear's order and the same bits,
tested below). In a mixed batch the BLAS product x·Wᵀ over n rows may block its float32 sums differently from the
product over one row, so logits differ by float32 rounding amplified through the layers: relative 1e-5 of the
logits' scale is ~100 float32 ulps, far below the gap between the two largest logits that decides a greedy token.
"""

import copy
import json

import numpy as np
import pytest

from lora_ref.adapters.lora import LoraConfig, inject_lora, lora_layers, merge_and_unload
from lora_ref.adapters.peft_files import load_adapter, save_adapter
from lora_ref.adapters.qlora import quantize_model
from lora_ref.autograd.tensor import no_grad
from lora_ref.modeling.generate import generate
from lora_ref.modeling.llama import Llama
from lora_ref.modeling.nn import Parameter
from lora_ref.serving.batch import AdapterSet, BatchDecoder
from lora_ref.testing import tiny_llama_config

STEPS = 6
PROMPTS = {0: ([1, 5, 9, 13, 17, 21, 25], "a"), 1: ([3, 4], "b"), 2: ([8, 6, 7, 5, 3], None), 3: ([2, 40, 41], "c")}
ADAPTERS = {  # different ranks and targets; "c" also adapts the tied head
    "a": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "b": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "c": dict(r=2, lora_alpha=6, target_modules=["o_proj", "down_proj", "lm_head"]),
}


def tiny_base(seed=0):
    return Llama(tiny_llama_config(tie_word_embeddings=True), rng=np.random.default_rng(seed))


@pytest.fixture(scope="module")
def base():
    return tiny_base()


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    rng = np.random.default_rng(1)
    out = {}
    for name, kw in ADAPTERS.items():
        m = inject_lora(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw), rng=rng)
        for _, p in m.named_parameters():
            if "lora_B" in _:
                p.data *= 4.0  # strong adapters, so that each visibly changes the output
        out[name] = save_adapter(m, root / name)
    return out


def adapter_set(base, folders, names=("a", "b", "c")):
    s = AdapterSet(base)
    for n in names:
        s.load(n, folders[n])
    return s


def with_adapter(base, folders, name):
    """lora_ref's own model with the adapter applied unmerged (LoraLinear layers)."""
    m = copy.deepcopy(base)
    return load_adapter(m, folders[name]) if name else m


def reference_logits(model, prompt, continuation):
    """Next-token logits after the prompt and after each continuation token: one full forward, no cache."""
    with no_grad():
        logits = model(np.array([list(prompt) + list(continuation)])).data[0]
    return logits[len(prompt) - 1:]


def run_batch(dec, prompts, steps=STEPS):
    """Greedy decoding of every prompt, all rows in one batch per step; tokens and logits per row."""
    toks, logits = {}, {}
    for row, (p, ad) in prompts.items():
        lg = dec.prefill(row, p, ad)
        toks[row], logits[row] = [int(np.argmax(lg))], [lg]
    for _ in range(steps):
        rows = list(prompts)
        lg = dec.decode(rows, [toks[r][-1] for r in rows])
        for j, r in enumerate(rows):
            toks[r].append(int(np.argmax(lg[j])))
            logits[r].append(lg[j])
    return toks, {r: np.array(v) for r, v in logits.items()}


def tol(logits):
    return 1e-5 * float(np.abs(logits).max())


@pytest.mark.parametrize("impl", ["auto", "numpy"])
def test_mixed_batch_equals_each_row_alone_and_lora_ref_generation(base, folders, impl):
    aset = adapter_set(base, folders)
    mixed_toks, mixed_logits = run_batch(BatchDecoder(base, aset, max_batch=4, impl=impl), PROMPTS)
    for row, (prompt, ad) in PROMPTS.items():
        alone_toks, alone_logits = run_batch(BatchDecoder(base, aset, max_batch=4, impl=impl), {row: (prompt, ad)})
        assert mixed_toks[row] == alone_toks[row]
        np.testing.assert_allclose(mixed_logits[row], alone_logits[row], rtol=0, atol=tol(alone_logits[row]))
        model = with_adapter(base, folders, ad)
        assert alone_toks[row] == generate(model, prompt, STEPS + 1)
        want = reference_logits(model, prompt, alone_toks[row][:-1])
        np.testing.assert_allclose(alone_logits[row], want, rtol=0, atol=tol(want))


def test_readable_twin_alone_is_lora_ref_generation_bit_for_bit(base, folders):
    """With impl="numpy" a row alone runs the unmerged LoraLinear's products in its order: the same bits as
    lora_ref's cached generation (prefill, then one token at a time)."""
    from lora_ref.modeling.generate import generate_tokens
    from lora_ref.modeling.llama import KVCache

    aset = adapter_set(base, folders)
    prompt, ad = PROMPTS[0]
    toks, logits = run_batch(BatchDecoder(base, aset, max_batch=1, impl="numpy"), {0: (prompt, ad)})
    model = with_adapter(base, folders, ad).eval()
    cache = KVCache(model.config.num_hidden_layers)
    want = []
    with no_grad():
        for step in [prompt] + [[t] for t in toks[0][:-1]]:  # the head on the last position only, as generation
            h = model.model(np.array([step]), cache)
            want.append(model.lm_head(h[:, -1:]).data[0, -1])
    assert np.array_equal(logits[0], np.array(want))
    assert toks[0] == list(generate_tokens(model, prompt, STEPS + 1))


def test_rows_equal_the_merged_model(base, folders):
    aset = adapter_set(base, folders)
    toks, logits = run_batch(BatchDecoder(base, aset, max_batch=4), PROMPTS)
    for row, (prompt, ad) in PROMPTS.items():
        # "c" adapts lm_head, which is tied to the embedding: merging into the shared array would change the input
        # embedding too, so the merged oracle unties the head first (serving unmerged never touches the table)
        untied = copy.deepcopy(base)
        untied.lm_head.weight = Parameter(untied.lm_head.weight.data.copy(), requires_grad=False)
        merged = merge_and_unload(load_adapter(untied, folders[ad])) if ad else untied
        assert toks[row] == generate(merged, prompt, STEPS + 1)
        want = reference_logits(merged, prompt, toks[row][:-1])
        # merging rounds W + s·B·A to float32 once per weight: a relative change ~1e-7 of each weight
        np.testing.assert_allclose(logits[row], want, rtol=0, atol=1e-4 * float(np.abs(want).max()))


def test_a_row_never_sees_another_rows_adapter(base, folders):
    aset = adapter_set(base, folders)
    prompt = [1, 2, 3, 4]
    alone = {ad: run_batch(BatchDecoder(base, aset, max_batch=1), {0: (prompt, ad)})[1][0]
             for ad in ("a", "b", "c", None)}
    # the adapters really differ on this prompt, by far more than the tolerance
    for x in alone:
        for y in alone:
            if x != y:
                assert np.abs(alone[x] - alone[y]).max() > 100 * tol(alone[x])
    same_prompt = {0: (prompt, "a"), 1: (prompt, "b"), 2: (prompt, None), 3: (prompt, "c")}
    _, mixed = run_batch(BatchDecoder(base, aset, max_batch=4), same_prompt)
    for row, (_, ad) in same_prompt.items():
        np.testing.assert_allclose(mixed[row], alone[ad], rtol=0, atol=tol(alone[ad]))


def test_nf4_base(base, folders):
    """A 4-bit base (every block's linear layer NF4, the tied head float): rows equal lora_ref's QLoRA model
    (LoraLinear4bit over the same codes) with the adapter unmerged."""
    q = quantize_model(copy.deepcopy(base))
    aset = adapter_set(q, folders)
    toks, logits = run_batch(BatchDecoder(q, aset, max_batch=4), PROMPTS)
    for row, (prompt, ad) in PROMPTS.items():
        model = load_adapter(copy.deepcopy(q), folders[ad]) if ad else q
        assert toks[row] == generate(model, prompt, STEPS + 1)
        want = reference_logits(model, prompt, toks[row][:-1])
        np.testing.assert_allclose(logits[row], want, rtol=0, atol=tol(want))


def test_hot_swap_while_rows_run(base, folders):
    """Load and unload adapters between decode steps: the running rows go on as if nothing happened."""
    aset = adapter_set(base, folders, names=("a", "b"))
    dec = BatchDecoder(base, aset, max_batch=3)
    want, _ = run_batch(BatchDecoder(base, adapter_set(base, folders, ("a",)), max_batch=1), {0: PROMPTS[0]})
    toks = [int(np.argmax(dec.prefill(0, PROMPTS[0][0], "a")))]
    toks.append(int(np.argmax(dec.decode([0], [toks[-1]])[0])))
    aset.load("c", folders["c"])  # a new adapter arrives
    c_first = dec.prefill(2, PROMPTS[3][0], "c")
    rows_tok = {0: toks[-1], 2: int(np.argmax(c_first))}
    with pytest.raises(ValueError, match="in use"):
        aset.unload("c")  # row 2 uses it
    aset.unload("b")  # nobody uses b
    assert aset.names() == ["a", "c"]
    for _ in range(STEPS - 1):
        lg = dec.decode([0, 2], [rows_tok[0], rows_tok[2]])
        toks.append(int(np.argmax(lg[0])))
        rows_tok = {0: toks[-1], 2: int(np.argmax(lg[1]))}
    assert toks == want[0]
    dec.free(2)
    aset.unload("c")  # free now
    aset.load("b", folders["b"])  # and back under the same name
    assert aset.names() == ["a", "b"]
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        dec.prefill(1, [1, 2], "c")


def test_adapter_set_holds_each_layers_factors_and_scaling_as_lora_ref_loads_them(base, folders):
    aset = adapter_set(base, folders)
    for name in ("a", "b", "c"):
        model = with_adapter(base, folders, name)
        lora = dict(lora_layers(model))  # lora_ref's own reading, adapter "default"
        held = aset.layers_of(name)
        assert sorted(held) == sorted(lora)
        for layer, (A, B, s) in held.items():
            assert np.array_equal(A, lora[layer].lora_A["default"].weight.data)
            assert np.array_equal(B, lora[layer].lora_B["default"].weight.data)
            assert s == lora[layer].scaling["default"]
    assert aset.layers_of("b")["model.layers.0.self_attn.q_proj"][2] == 4 / np.sqrt(8)  # rsLoRA: α/√r
    with pytest.raises(ValueError, match="no adapter named"):
        aset.layers_of("zz")


def test_loads_and_unloads_in_another_thread_do_not_disturb_a_running_batch(base, folders):
    """A server loads adapters from its request handlers while the engine decodes: each step reads one snapshot of
    the adapters, so rows on other adapters go on exactly as alone."""
    import threading

    aset = adapter_set(base, folders, ("a", "b"))
    want, _ = run_batch(BatchDecoder(base, aset, max_batch=2), {0: PROMPTS[0], 1: PROMPTS[1]}, steps=20)
    stop, errors, swaps = threading.Event(), [], [0]

    def churn():
        try:
            while not stop.is_set():
                aset.load("c", folders["c"])
                aset.unload("c")
                swaps[0] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        got, _ = run_batch(BatchDecoder(base, aset, max_batch=2), {0: PROMPTS[0], 1: PROMPTS[1]}, steps=20)
    finally:
        stop.set()
        worker.join()
    assert not errors and swaps[0] > 0
    assert got == want


def test_free_row_is_reusable_and_lengths_are_tracked(base, folders):
    dec = BatchDecoder(base, adapter_set(base, folders, ("a",)), max_batch=2)
    dec.prefill(1, [1, 2, 3], "a")
    assert dec.active_rows() == [1] and dec.length(1) == 3 and dec.adapter_of(1) == "a"
    dec.decode([1], [4])
    assert dec.length(1) == 4
    dec.free(1)
    dec.free(1)  # freeing a free row does nothing
    assert dec.active_rows() == []
    first = dec.prefill(1, [5, 6], None)
    again = BatchDecoder(base, AdapterSet(base), max_batch=1).prefill(0, [5, 6], None)
    assert np.array_equal(first, again)  # nothing left over from the earlier sequence


# --------------------------------------------------------------------------------------------- bad input
def test_load_refuses_bad_folders_and_keeps_what_is_loaded(base, folders, tmp_path):
    aset = adapter_set(base, folders, ("a",))

    def variant(name, edit):
        import shutil

        d = tmp_path / name
        shutil.copytree(folders["b"], d)
        edit(d)
        return d

    def truncate(d):
        f = d / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:-50])

    def config(**changes):
        def edit(d):
            cfg = json.loads((d / "adapter_config.json").read_text())
            cfg.update(changes)
            (d / "adapter_config.json").write_text(json.dumps(cfg))
        return edit

    cases = {
        "missing": (tmp_path / "nowhere", "not found|does not exist|no such|adapter folder"),
        "truncated": (variant("truncated", truncate), "adapter_model.safetensors"),
        "bad json": (variant("badjson", lambda d: (d / "adapter_config.json").write_text("{not json")),
                     "adapter_config.json"),
        "no weights": (variant("noweights", lambda d: (d / "adapter_model.safetensors").unlink()),
                       "adapter_model.safetensors not found"),
        "absent target": (variant("absent", config(target_modules=["w_proj"])), "not found in the base model"),
        "rank mismatch": (variant("rank", config(r=3)), "has shape"),
        "dora": (variant("dora", config(use_dora=True)), "DoRA"),
        "embedding": (variant("embed", config(target_modules=["embed_tokens"])), "embed_tokens"),
    }
    for what, (folder, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            aset.load("x", folder)
        assert aset.names() == ["a"], what
    with pytest.raises(ValueError, match="already loaded"):
        aset.load("a", folders["b"])
    for bad in ("", " a", None):
        with pytest.raises(ValueError, match="adapter name"):
            aset.load(bad, folders["b"])
    with pytest.raises(ValueError, match="no adapter named"):
        aset.unload("b")


def test_adapter_set_refuses_a_model_with_lora_layers(base, folders):
    with pytest.raises(ValueError, match="already has LoRA layers"):
        AdapterSet(load_adapter(copy.deepcopy(base), folders["a"]))
    with pytest.raises(ValueError, match="lora_ref Llama"):
        AdapterSet(object())
    with pytest.raises(ValueError, match="same model"):
        BatchDecoder(tiny_base(1), AdapterSet(base), max_batch=1)


def test_decoder_bad_input(base, folders):
    dec = BatchDecoder(base, adapter_set(base, folders, ("a",)), max_batch=2)
    V, limit = base.config.vocab_size, base.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_batch"):
        BatchDecoder(base, dec.adapters, max_batch=0)
    with pytest.raises(ValueError, match="row must be an integer"):
        dec.prefill(2, [1], None)
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        dec.prefill(0, [1], "zz")
    with pytest.raises(ValueError, match="out of range"):
        dec.prefill(0, [V], None)
    with pytest.raises(ValueError, match="must be integers"):
        dec.prefill(0, [1.5, 2.0], None)
    with pytest.raises(ValueError, match="empty"):
        dec.prefill(0, [], None)
    with pytest.raises(ValueError, match="too long"):
        dec.prefill(0, [1] * (limit + 1), None)
    assert dec.active_rows() == []  # failed prefills leave nothing behind
    dec.prefill(0, [1] * (limit - 1), "a")
    with pytest.raises(ValueError, match="in use"):
        dec.prefill(0, [1], None)
    with pytest.raises(ValueError, match="not prefilled"):
        dec.decode([0, 1], [1, 1])
    with pytest.raises(ValueError, match="distinct"):
        dec.decode([0, 0], [1, 1])
    with pytest.raises(ValueError, match="one per row"):
        dec.decode([0], [1, 2])
    with pytest.raises(ValueError, match="out of range"):
        dec.decode([0], [-1])
    with pytest.raises(ValueError, match="at least one row"):
        dec.decode([], [])
    dec.decode([0], [1])  # the last position
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dec.decode([0], [1])
