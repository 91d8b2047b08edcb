"""Scanner daemons asked about a message: spamd, clamd.  Sans-IO codecs (``spamd``,
``clamd``) over one I/O loop that runs several exchanges at once (``exchange``); results
are plain data (``results``).  Imports ``defang.core`` only; the filter API
(``defang.workers.api.scanning``) decides when to ask and logs what went wrong."""
