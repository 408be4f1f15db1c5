"""Install with `pip install -e ".[dev]"` (see README.md)."""
import setuptools

CORE = [
    "jax>=0.6",                   # keystr(simple=, separator=), jax.random.key(impl=)
    "flax>=0.11",                 # nnx.to_pure_dict / replace_by_pure_dict
    "optax>=0.2.5",               # optax.tree.norm, sgdr_schedule
    "orbax-checkpoint>=0.11",
    "ml-collections>=0.1.1",
    "chex>=0.1.86",
    "numpy>=1.26",
    "scikit-learn>=1.3",
    "scipy>=1.11",
    "absl-py>=2.0",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]
EXTRAS = {
    "tfds": ["tensorflow-datasets>=4.9.6", "array_record>=0.5"],
    "text": ["transformers>=4.40", "safetensors>=0.4", "tokenizers>=0.19"],
}
EXTRAS["dev"] = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    *EXTRAS["text"],
    *EXTRAS["tfds"],
]

setuptools.setup(
    name="ensembling",
    version="0.1.0",
    description="Deep ensembles and weight averaging in JAX/Flax: pure functions on pytrees.",
    packages=setuptools.find_packages(include=["ensembling", "ensembling.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
