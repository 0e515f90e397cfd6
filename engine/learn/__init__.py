"""Learning rotations: Cayley SGD, SpinQuant/FLRot training, the spread of random rotations, distributed runs."""
