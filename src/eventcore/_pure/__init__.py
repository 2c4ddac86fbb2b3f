"""Pure-Python hot path: the executable specification of the Cython extension.

Every public function here has a compiled twin with the same name, signature
and behaviour (the Cython issue adds it under ext/). `eventcore._impl` picks
one set or the other according to EVENTCORE_IMPL.
"""
