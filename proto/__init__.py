"""`pdserve.proto`'s service definition and its generated modules (regenerate with `python -m pdserve.proto.generate`)."""
