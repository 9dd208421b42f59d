"""dreambooth-cluster: shared pieces (model loading, the tiny offline model, errors) and the `dreambooth` CLI."""
