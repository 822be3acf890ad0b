"""Shipped training configs (`get_config()` modules for ml_collections' `--config=`): `default`
(CPU-sized, `default:mnist` for MNIST) and `omniglot_koch` (Koch et al. at paper scale)."""
