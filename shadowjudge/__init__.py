"""ShadowJudge: continuous evaluation of LLM traffic."""

__version__ = "0.1.0"
