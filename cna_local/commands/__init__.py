"""One module per CLI command; cna_local.cli registers them on the `cna-local` group."""
