"""`python -m glm4v.kernels`: build (or find) the CPU decode kernels now, not at the first chat."""

from glm4v.kernels import cpu_kernels

if __name__ == "__main__":
    ready = cpu_kernels() is not None
    print(f"glm4v CPU decode kernels: {'ready' if ready else 'not used on this machine (torch kernels instead)'}")
