"""spleen-deepedit: interactive and automatic 3D spleen segmentation from CT (DeepEdit).

Heavy optional runtimes (Ray, FastAPI, boto3) are imported lazily by the modules that need them,
so `import trainer` works on a CPU-only machine with the core dependencies alone.
"""

__version__ = "0.1.0"
