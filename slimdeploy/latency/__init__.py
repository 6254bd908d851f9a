"""Latency: runners (backends), the one timing protocol (timing), hardware fingerprints, the pieces a profile times
(components), profiling (profile), the whole models it calibrates on (draws) and the fit of their latency
(calibration), whole-model measurement (measure), and the model that predicts a structure's latency from a profile
(model)."""
