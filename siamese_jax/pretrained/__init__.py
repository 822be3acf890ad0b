"""The shipped pretrained model file(s): data, loaded by `siamese_jax.inference.load_model("pretrained")`."""
