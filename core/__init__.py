"""The torch-free core: what every other room stands on, needing neither Ray, gRPC, protobuf nor torch.

Manifest, vocabularies, tokenizers, images and encoder inputs (`manifest`, `vocab`, `subwords`,
`images`, `sources`); request types, validation and errors (`requests`, `codec`, `errors`); the
ONNX Runtime model and its wiring (`onnx_model`, `wiring`); the decode loop (`decoding`: the
running batch, greedy and beam); a model's runner (`model_runner`: requests -> decoding jobs ->
answers); the policy (`scheduler`: admit, join, drop, as data) and its execution (`engine`: a
thread per model). The service, batch inference, evaluation and the export parity checks
(`models/`, `export/`) all share it; `tests/unit/test_rooms.py` holds it to that.
"""
