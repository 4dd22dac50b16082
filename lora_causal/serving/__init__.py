"""From adapter to served model: serving-engine checks for adapters and recipes, and GGUF export with a parity report.

Modules: `rules` (what vLLM, SGLang and llama.cpp accept, read from their sources), `facts` (what an adapter or a
recipe declares), `check` (`lora-causal check-serving`), `gguf_vocab` and `gguf_writer` (our GGUF writer on the
`gguf` package), `parity` (the exported file read back against the merged model), `modelfile` (Ollama),
`quantize` (llama.cpp's own converter and quantizer, when a user has them) and `export` (`lora-causal export`).
"""
