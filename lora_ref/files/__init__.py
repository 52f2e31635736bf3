"""Files: the one safetensors reader and writer, HF checkpoint folders, outputs written atomically, the artifact cache. Imports nothing else from lora_ref."""
