"""The model and its weights: config, the NLD network (`nld`), checkpoint reading and validation,
community formats, quantization (+ AWQ calibration), the transformers reference and the tiny-checkpoint
and training helpers. Imports only `edge_dlm.primitives`."""
