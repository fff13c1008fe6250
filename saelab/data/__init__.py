"""The data path: specs of where text and models come from (`specs`), token rows from text
(`tokens`), activations computed on the fly (`activations`), activation caches on disk
(`cache`), and the held-out rows evals read (`heldout`)."""
