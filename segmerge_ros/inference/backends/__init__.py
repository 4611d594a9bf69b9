"""Where the network runs: eager, torch.compile, OpenVINO, TensorRT, and the engine cache."""
