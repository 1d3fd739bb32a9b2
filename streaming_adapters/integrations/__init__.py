"""Integrations with training frameworks.  Each one is a sub-package imported only on demand: the core
(``import streaming_adapters``) never imports a framework."""
