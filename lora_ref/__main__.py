"""``python -m lora_ref`` is the ``lora-ref`` command."""

from lora_ref.cli import main

raise SystemExit(main())
