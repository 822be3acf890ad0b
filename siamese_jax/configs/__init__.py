"""Shipped training configs (`get_config()` modules for ml_collections' `--config=`): `default`
(CPU-sized, `default:mnist` for MNIST), `omniglot_koch` (Koch et al. at paper scale), `omniglot_gpu`
(4 x conv-128 at 56 px with batch-hard, for accelerators), `mnist_pairs`,
`omniglot_pretrained` (the shipped config) and `omniglot_distilled` (it, distilled from five variants)."""
