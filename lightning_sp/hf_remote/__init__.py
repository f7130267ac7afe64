"""Standalone model code shipped inside exported LLaVA-SP directories (`trust_remote_code`).

`python -m lightning_sp export` copies `configuration_llava_sp.py` and `modeling_llava_sp.py` next to the weights
of an SP-variant export; `AutoModelForImageTextToText` (also `AutoModelForCausalLM`, `AutoModel`)
`.from_pretrained(dir, trust_remote_code=True)` then loads the model with nothing from lightning_sp installed. The
two files must therefore import only torch and transformers (and each other, relatively). So must
`processing_llava_sp.py`, copied into any export (mlp included) whose tokenizer needs LLaVA's piece-by-piece prompt
tokenisation (`AutoProcessor.from_pretrained(dir, trust_remote_code=True)`). `tests/test_export.py`
checks that the exported model reproduces our logits; `tests/test_hf_export_client.py` that a process without
lightning_sp uses it as the llava-hf model cards say and gets our answers.
"""
