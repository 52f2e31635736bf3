"""The tour: the sections of ``lora-ref tour``, in the order the report shows them.

Each section is a function ``section(ctx)`` in a module of its own here: it computes its numbers with the library,
checks the claims its text makes (``ctx.check``: a false claim stops the tour, nothing is written), writes markdown
and figures through ``ctx`` (:class:`lora_ref.tour.context.TourContext`) and adds summary lines. Sections run in
order and share objects through ``ctx.state`` (for example ``ctx.state["base"]``, the pretrained model). To extend
the tour, write a module with a section function and add it to :data:`SECTIONS`.
"""

from __future__ import annotations

from lora_ref.tour.finetuning import section_comparison
from lora_ref.tour.memory import section_memory
from lora_ref.tour.merging import section_merging
from lora_ref.tour.nf4 import section_nf4
from lora_ref.tour.pretraining import section_pretraining
from lora_ref.tour.rank_study import section_rank_study
from lora_ref.tour.real_llm import section_real_llm

SECTIONS = [
    ("Pretraining the tutorial model", section_pretraining),
    ("Fine-tuning on Python source: full, LoRA and QLoRA", section_comparison),
    ("The rank study: singular values of the full fine-tune's updates", section_rank_study),
    ("Memory: predicted and measured", section_memory),
    ("Merging: float and 4-bit bases", section_merging),
    ("NF4: agreement with bitsandbytes", section_nf4),
    ("A real LLM: SmolLM2-135M-Instruct learns invented facts", section_real_llm),
]
