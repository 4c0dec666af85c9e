"""meshwright: learn how services really talk; propose the policy that allows exactly that."""

__version__ = "0.1.0"
