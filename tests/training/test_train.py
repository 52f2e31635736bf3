"""Training: seeded training lowers validation loss by a stated margin; train_step trains only what it is given;
checkpoints are HF folders that load back; the history is complete and deterministic."""

import json
import math

import numpy as np
import pytest

from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.testing import tiny_llama_config
from lora_ref.training.data import Corpus, pretraining_corpus, sample_batch, unigram_bits_per_byte
from lora_ref.training.loop import History, decay_groups, evaluate, lm_loss, train, train_step
from lora_ref.training.optim import AdamW

TINY = tiny_llama_config(vocab_size=256, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         max_position_embeddings=32, rms_norm_eps=1e-5)


def tiny_model(seed=0):
    return Llama(LlamaConfig(**TINY), rng=np.random.default_rng(seed))


@pytest.fixture(scope="module")
def corpus():
    return pretraining_corpus()


@pytest.fixture(scope="module")
def trained(corpus):
    model = tiny_model()
    hist = train(model, corpus, 150, 1e-2, 8, 32, np.random.default_rng(1), eval_every=50, eval_batches=4,
                 progress=False)
    return model, hist


def test_training_lowers_validation_loss_by_a_margin(trained, corpus):
    _, hist = trained
    # before training the prediction is near uniform: ln 256 = 5.545 nats per byte
    assert hist.val_steps == [0, 50, 100, 150]
    assert abs(hist.val_loss[0] - math.log(256)) < 0.05
    # stated margin: at least 2.5 nats lower, and 0.3 nats below what byte frequencies alone achieve
    unigram_nats = unigram_bits_per_byte(corpus) * math.log(2)  # ≈ 3.25 nats for pydoc text
    assert hist.final_val_loss < hist.val_loss[0] - 2.5
    assert hist.final_val_loss < unigram_nats - 0.3
    assert hist.val_loss == sorted(hist.val_loss, reverse=True)  # it improved at every evaluation


def test_history_is_complete(trained):
    model, hist = trained
    assert hist.steps == 150 and len(hist.train_loss) == len(hist.lr) == 150
    assert hist.tokens == 150 * 8 * 32 and hist.tokens_per_second > 0
    assert max(hist.lr) == pytest.approx(1e-2) and hist.lr[0] == 0.0  # linear warmup from 0
    assert hist.lr[-1] == pytest.approx(1e-3, rel=0.01)  # cosine decay towards lr / 10
    again = History.from_dict(json.loads(json.dumps(hist.to_dict())))
    assert again.val_loss == hist.val_loss and again.tokens == hist.tokens
    assert model.training  # train() leaves the model in training mode


def test_training_is_deterministic(corpus):
    runs = []
    for _ in range(2):
        hist = train(tiny_model(), corpus, 5, 1e-2, 4, 16, np.random.default_rng(7), eval_batches=1, progress=False)
        runs.append(hist.train_loss)
    assert runs[0] == runs[1]


def test_train_step_trains_only_the_optimizer_parameters(corpus):
    model = tiny_model()
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if "mlp" not in n}
    for n, p in model.named_parameters():
        p.requires_grad = "mlp" in n
    opt = AdamW(decay_groups(model, 0.1), lr=1e-2)
    x, y = sample_batch(corpus.train, 4, 16, np.random.default_rng(0))
    before = float(lm_loss(model, x, y).data)
    losses = [train_step(model, opt, x, y) for _ in range(5)]
    assert losses[0] == pytest.approx(before, rel=1e-6)  # train_step returns the loss before its update
    assert losses[-1] < losses[0]  # the same batch five times: the loss falls
    for n, p in model.named_parameters():
        if n in frozen:
            np.testing.assert_array_equal(p.data, frozen[n])
    assert len(opt.state) == 2 * 3  # m/v state for the 3 MLP matrices of each of 2 layers, nothing else


def test_schedule_scales_every_parameter_group(corpus):
    model = tiny_model()
    params = [p for _, p in model.named_parameters()]
    opt = AdamW([{"params": params[:3], "lr": 2e-3}, {"params": params[3:], "lr": 8e-3}])  # a LoRA+-style ratio
    hist = train(model, corpus, 20, 4e-3, 2, 16, np.random.default_rng(0), warmup=4, min_lr=4e-4, optimizer=opt,
                 eval_batches=1, progress=False)
    # the last step (index 19) ran at factor 0.1 + 0.9 · ½(1 + cos(π · 15/16)) of each group's peak: ratio kept
    factor = 0.1 + 0.45 * (1 + math.cos(math.pi * 15 / 16))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3 * factor, 8e-3 * factor], rel=1e-12)
    assert hist.lr[4] == pytest.approx(2e-3) and hist.lr[2] == pytest.approx(1e-3)  # the first group's schedule


def test_evaluate_matches_lm_loss_and_restores_mode():
    model = tiny_model()
    tokens = np.arange(3 * 16 + 1) % 256
    x = tokens[:48].reshape(3, 16)
    y = tokens[1:49].reshape(3, 16)
    assert evaluate(model, tokens, batch=8, seq=16) == pytest.approx(float(lm_loss(model, x, y).data), rel=1e-6)
    assert model.training


def test_checkpoints_are_hf_folders(tmp_path, corpus):
    model = tiny_model()
    small = Corpus("small", corpus.train[:5000], corpus.val[:2000])
    out = tmp_path / "ckpt"
    hist = train(model, small, 4, 1e-2, 2, 16, np.random.default_rng(0), checkpoint_dir=out, checkpoint_every=2,
                 eval_batches=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    last = out / "checkpoint-4"
    assert sorted(p.name for p in last.iterdir()) == ["config.json", "model.safetensors", "trainer_state.json"]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["steps"] == 4 and state["train_loss"] == hist.train_loss
    loaded = Llama.from_pretrained(last)
    ids = np.arange(10)[None, :]
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))
    # a non-empty checkpoint folder is refused before any training
    with pytest.raises(ValueError, match="not empty"):
        train(tiny_model(), small, 1, 1e-2, 2, 16, np.random.default_rng(0), checkpoint_dir=out, progress=False)


def test_train_bad_input(corpus):
    with pytest.raises(ValueError, match="rng"):
        train(tiny_model(), corpus, 1, 1e-2, 2, 16, 0, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train(tiny_model(), corpus, 0, 1e-2, 2, 16, np.random.default_rng(0), progress=False)
    with pytest.raises(ValueError, match="learning rate"):
        train(tiny_model(), corpus, 1, 0.0, 2, 16, np.random.default_rng(0), progress=False)
