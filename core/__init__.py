"""The torch-free core: manifest, vocabularies, tokenizers, images, errors, decode loop and engine.

It needs neither Ray nor the protobuf stubs, so the service, batch inference, evaluation and the
export parity checks (`models/`, `export/`) all share it.
"""
