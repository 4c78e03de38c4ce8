"""cnnlab: train, evaluate, explain and serve convolutional image classifiers."""
