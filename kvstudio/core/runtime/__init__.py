"""One run through the model: the engine's generate loop, PolicyCache and its layers, the attention function."""
