"""edgeml.runtime: load, verify and run artifacts; light enough for a device.

Imports numpy and the one backend an artifact needs, nothing else.
"""

from edgeml.runtime.model import Model, SelfTestResult, TensorSpec, load

__all__ = ["Model", "SelfTestResult", "TensorSpec", "load"]
