"""t5lite: a small, exactly resumable JAX training stack for T5-family models."""
from setuptools import find_packages, setup

setup(
    name='t5lite',
    version='0.1.0',
    description='Pretrain, fine-tune and evaluate T5-family models in JAX, from one CPU to a pod.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['t5lite', 't5lite.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.7.0',               # jax.set_mesh
        'flax>=0.10.0',             # linen logical partitioning
        'optax>=0.2.5',             # optax.tree.norm, tree_map_params
        'orbax-checkpoint>=0.11.0',
        'tensorflow-datasets>=4.9.6',
        'ml-collections>=0.1.1',
        'grain>=0.2.10',            # grain.MapDataset / IterDataset API
        'sentencepiece>=0.2.0',
        'absl-py>=1.4.0',
        'tensorboardX>=2.6',
        'numpy>=1.26',
    ],
    extras_require={
        # The suite runs the HuggingFace parity and metric tests too. torch itself is installed
        # first by the README's command (`pip install torch==2.13.0`): a bare `torch` requirement
        # here would pull the multi-GB CUDA build on machines without a CPU wheel at hand.
        'test': ['pytest>=8.0', 'pytest-xdist>=3.5', 'transformers>=4.40', 'safetensors>=0.4',
                 'sacrebleu>=2.4', 'rouge-score>=0.1.2', 'scipy>=1.10',
                 # executing docs/notebooks/quickstart.ipynb headlessly
                 'nbclient>=0.10', 'nbformat>=5.9', 'ipykernel>=6.29', 'matplotlib>=3.8',
                 # the tree's one formatter (pyproject.toml; tests/test_format.py)
                 'yapf>=0.40'],
        'tf': ['tensorflow>=2.16'],                      # TFDS catalog builders, tfds mock data
        'hf': ['torch>=2.2', 'transformers>=4.40', 'safetensors>=0.4'],  # HuggingFace interop
        'metrics': ['sacrebleu>=2.4', 'rouge-score>=0.1.2', 'scipy>=1.10'],
    },
)
