"""pdserve: prefill/decode-disaggregated serving for the ERNIE 4.5 family."""

__version__ = "0.1.0"
