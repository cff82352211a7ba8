"""matplotlib's pyplot for writing figures to files (the headless Agg backend), or None when
matplotlib is not installed (it is optional; says so): for the benchmarks, run from this folder."""


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt
