"""A tiny Zope add-on whose every change is a journaled command.

Its views (registered in configure.zcml) change OFS objects only through
the commands of :mod:`zjexample.commands`, run with
:func:`zjournal.zope.execute` in the request's transaction.
"""
