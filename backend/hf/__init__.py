"""Transformers models behind the runner contract (HFRunner) and the plain generate baseline."""
