"""Export and serving binaries: `export_saved_model` (a pretraining run -> versioned SavedModel),
`serve` (a TF Serving compatible gRPC/REST server) and `client` (features of image files)."""
