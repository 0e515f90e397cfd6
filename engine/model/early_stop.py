"""Ending a forward pass early: a forward hook raises StopForward once the layer of interest has run, and the
caller catches it (capture reads one layer's sites, GPTQ the inputs of the first decoder layer)."""


class StopForward(Exception):
    """Raised by a forward hook to end the pass once the layer of interest has run (capture, GPTQ's inputs)."""
