"""After training: adapters found and checked, merged into their base and measured, checked against serving
engines, and exported to GGUF with a parity report.

Modules: `adapters` (an adapter on disk and its base), `merging` and `fidelity` (merge, and what it changed),
`rules` (what vLLM, SGLang and llama.cpp accept, read from their sources), `facts` (what an adapter or a recipe
declares), `check` (`lora-causal check-serving`), `gguf_vocab` and `gguf_writer` (our GGUF writer on the `gguf`
package), `parity` (the exported file read back against the merged model), `modelfile` (Ollama), `quantize`
(llama.cpp's own converter and quantizer, when a user has them) and `export` (`lora-causal export`).
Imports `lora_causal.model`, `lora_causal.data` and `lora_causal.core`.
"""
