"""Model backends, one module per family; :mod:`vlmlab.backends.qwen2_vl` is the generative VLM door (``load_vlm``)."""
