"""Viruses: refuse infected mail, tell the administrator, never pass a message unscanned.

Needs [clamav] address in defang.toml (clamd; on a Unix socket the spool file is passed
to clamd, no byte copied) and [notify] (how notices are sent, and the administrator).

  * infected: refused with 554 (the sender's MTA tells the sender); the administrator
    gets a notice with the virus names, the envelope and the client, sent after the
    reply (a notice that cannot be sent is logged and changes nothing);
  * not scanned (clamd down, timing out, answering garbage): 451, the sending MTA retries
    later.  Mail is delayed, never passed unscanned;
  * too big to scan (streamed to clamd over TCP, bigger than [clamav] max_size): refused
    with 552 5.3.4, as retrying cannot help (a 451 would be retried for days, then
    bounced).  The other choice: deliver it unscanned with a header saying so (replace
    the reject with msg.add_header("X-Virus-Scan", f"not scanned: {virus.skipped}"));
    or raise max_size with clamd's StreamMaxLength, or pass clamd the file (unix socket);
  * clean: delivered.
"""

from defang import reject, tempfail


def filter_begin(msg):
    msg.start_checks("clamav")


def filter_end(msg):
    virus = msg.clamav()
    if virus.error:
        return tempfail("Virus scan unavailable, try again later", code="451", dsn="4.7.1")
    if virus.oversize:
        msg.tag("virus_too_big")
        return reject(f"Message too big to scan for viruses ({virus.oversize} bytes)",
                      code="552", dsn="5.3.4")
    if virus.infected:
        names = ", ".join(virus.viruses)
        c = msg.conn
        msg.notify_administrator(
            f"Virus refused: {names}",
            f"defang refused a message with {names}.\n\n"
            f"Queue ID:   {msg.queue_id or '-'}\n"
            f"Sender:     <{msg.sender}>\n"
            f"Recipients: {', '.join(msg.recipients)}\n"
            f"Client:     {c.hostname} [{c.ip}], HELO {c.helo}\n"
            f"Subject:    {msg.subject}\n",
        )
        msg.tag("virus")
        return reject(f"Virus found: {names}", code="554", dsn="5.7.1")
    return None
