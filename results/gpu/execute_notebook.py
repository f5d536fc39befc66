"""Execute cifar10_resnet18.ipynb as committed (EPOCHS = 20, DATA_DIR ./data) in a real kernel, from
the repository root, and save it with its outputs to DEST:

    python3 results/gpu/execute_notebook.py DEST

Needs nbclient, nbformat and ipykernel (requirements-dev.txt; run.sh installs them from .whl/ on
the GPU machine).
"""
import sys

import nbclient
import nbformat


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    nb = nbformat.read("cifar10_resnet18.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": "."}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, sys.argv[1])  # what ran so far, even when a cell failed


if __name__ == "__main__":
    main()
