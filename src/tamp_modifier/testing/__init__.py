"""What tests and benchmarks build on: tiny real models of each supported family built from
configs, with calibration data (``synthetic``), and the baseline pruning methods (``baselines``)."""
