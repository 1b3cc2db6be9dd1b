"""A small bank on Pyramid and zjournal: the example application.

Serve it with ``pserve development.ini``; see README.rst.
"""
from pyramid.config import Configurator

# Imported before the include: recovery at startup replays the journal,
# and needs every command class it names to be registered by then.
from zjournal_bank import commands  # noqa: F401


def main(global_config, **settings):
    """The WSGI application (a PasteDeploy app factory)."""
    with Configurator(settings=settings) as config:
        # pyramid_tm, pyramid_retry and pyramid_zodbconn come with it.
        config.include("zjournal.pyramid")
        config.include("zjournal_bank.views")
    return config.make_wsgi_app()
