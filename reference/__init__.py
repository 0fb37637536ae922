"""The oracle: the numerical contract of ``SPEC.md`` written as plain NumPy/SciPy, installed as
``qlora.reference``. It shares no code with ``qlora.kernels`` and imports neither torch nor triton.
"""
