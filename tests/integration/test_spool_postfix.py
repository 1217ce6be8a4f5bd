"""Big messages through a real private Postfix with fuglu spooling them (issue 14):
Postfix -> fuglu (after-queue smtp, spool_threshold 64 KB) -> Postfix re-injection -> Maildir.

* a message over the threshold passes byte-exact apart from the added headers, and its
  spool file is gone once the message is done;
* fuglu killed with SIGKILL while it receives, or while it scans, a big message leaves
  its spool file behind; the next start removes it, and Postfix, which never had a 250,
  delivers the message once fuglu is back (no mail lost).
* on the process backend, a worker killed while it scans a big message: the parent
  removes its spool file at once, and Postfix delivers the message later.

fuglu starts as root and runs as nobody, as in production: the spool directory belongs
to nobody.
"""

import os
import random
import signal
import socket
import uuid

import pytest

import peers
from test_afterqueue import assert_identical_apart_from_added_headers, wait_queue_empty

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN_DIR = os.path.join(HERE, 'plugins')
THRESHOLD = 65536


@pytest.fixture(autouse=True)
def started_as_root():
    if os.geteuid() != 0:
        peers._peer_unavailable('these tests start fuglu as root (it drops to nobody)')


@pytest.fixture
def nobody_dirs():
    made = []

    def make(prefix):
        path = peers.world_dir(prefix)
        peers.chown_tree(path, 'nobody')
        made.append(path)
        return path
    yield make
    for path in made:
        peers.remove_world_dir(path)


def spool_files(directory):
    return sorted(name for name in os.listdir(directory) if name.startswith('fuglu-spool-'))


def config(postfix, spooldir, gatedir=None):
    text = ('[main]\nincomingport = smtp:127.0.0.1:%d\noutgoinghost = 127.0.0.1\n'
            'outgoingport = %d\nprependers =\nappenders =\ncontrolport =\ntempdir = %s\n'
            'spool_threshold = %d\n' % (postfix.filter_port, postfix.reinject_port, spooldir,
                                        THRESHOLD))
    if gatedir:
        text += 'plugindir = %s\nplugins = gate.Gate\n' % PLUGIN_DIR
    else:
        text += 'plugins =\n'
    text += '[performance]\nminthreads = 2\nmaxthreads = 10\n'
    if gatedir:
        text += '[Gate]\ngatedir = %s\n' % gatedir
    return text


def big_message(recipient, lines=40000, seed=14):
    """~3 MB: dot lines (stuffed on the wire), a lone '.', 8-bit text, lines below SMTP's
    998 octets (Postfix would break longer ones)."""
    rng = random.Random(seed)
    body = []
    for number in range(lines):
        kind = number % 50
        if kind == 0:
            body.append(b'.')
        elif kind == 1:
            body.append(b'..two dots %d' % number)
        elif kind == 2:
            body.append(b'.leading dot \xc3\xa4\xc3\xb6\xc3\xbc %d' % number)
        else:
            body.append(bytes(rng.choice(b'abcdefghij .,:-') for _ in range(rng.randint(0, 140))))
    return (b'From: <sender@example.org>\r\nTo: <' + recipient.encode() + b'>\r\n'
            b'Subject: big spooled message\r\nMessage-ID: <' + uuid.uuid4().hex.encode() +
            b'@example.org>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n'
            b'Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n'
            b'\r\n' + b'\r\n'.join(body) + b'\r\n')


def unique(name):
    return '%s-%s@example.net' % (name, uuid.uuid4().hex[:8])


def test_big_message_passes_byte_exact_and_its_spool_file_is_removed(postfix_factory,
                                                                     fuglu_factory, nobody_dirs):
    postfix = postfix_factory('afterqueue')
    spooldir = nobody_dirs('fuglu-spool-')
    fuglu = fuglu_factory(config(postfix, spooldir))
    fuglu.wait_log(r'Startup complete')
    recipient = unique('big')
    message = big_message(recipient)
    assert len(message) > 40 * THRESHOLD
    reply = postfix.send('sender@example.org', [recipient], message, smtputf8=True)
    assert reply.code == 250, reply
    delivered = postfix.wait_delivered(recipient, timeout=60)
    assert_identical_apart_from_added_headers(message, delivered)
    # the file went with the message
    peers.wait_until(lambda: spool_files(spooldir) == [], 10, what='the spool file removed')
    wait_queue_empty(postfix)
    assert 'Traceback' not in fuglu.log_text()


def kill_and_restart(fuglu, fuglu_factory, text):
    """SIGKILL to all of fuglu (nothing runs on fuglu's side: no finally, no atexit), then
    a new fuglu on the same config; returns it once it completed its start-up."""
    fuglu.kill_all()
    restarted = fuglu_factory(text)
    restarted.wait_log(r'Startup complete')
    return restarted


def test_kill_while_receiving_leaves_no_spool_file_after_the_next_start(postfix_factory,
                                                                       fuglu_factory,
                                                                       nobody_dirs):
    postfix = postfix_factory('afterqueue')
    spooldir = nobody_dirs('fuglu-spool-')
    text = config(postfix, spooldir)
    fuglu = fuglu_factory(text)
    fuglu.wait_log(r'Startup complete')
    client = socket.create_connection(('127.0.0.1', postfix.filter_port), timeout=30)
    reader = client.makefile('rb')
    try:
        assert reader.readline().startswith(b'220')
        for command in (b'EHLO client.example\r\n', b'MAIL FROM:<sender@example.org>\r\n',
                        b'RCPT TO:<%s>\r\n' % unique('crash').encode(), b'DATA\r\n'):
            client.sendall(command)
            reply = reader.readline()
            while reply[3:4] == b'-':
                reply = reader.readline()
            assert reply[:1] in (b'2', b'3'), reply
        client.sendall(b'Subject: cut off\r\n\r\n' + b'a line of a message in transit\r\n' * 30000)
        # fuglu writes it to its spool file as it arrives
        peers.wait_until(lambda: spool_files(spooldir) and
                         os.path.getsize(os.path.join(spooldir, spool_files(spooldir)[0]))
                         > THRESHOLD, 30, what='the message in a spool file')
        restarted = kill_and_restart(fuglu, fuglu_factory, text)
    finally:
        client.close()
    assert spool_files(spooldir) == []
    restarted.wait_log(r'removed 1 spool file\(s\) left in %s' % spooldir)


def test_kill_while_scanning_leaves_no_spool_file_and_postfix_delivers_later(postfix_factory,
                                                                           fuglu_factory,
                                                                           nobody_dirs):
    postfix = postfix_factory('afterqueue')
    spooldir = nobody_dirs('fuglu-spool-')
    gatedir = nobody_dirs('fuglu-gate-')
    text = config(postfix, spooldir, gatedir)
    fuglu = fuglu_factory(text)
    fuglu.wait_log(r'Startup complete')
    recipient = unique('scanning')
    message = big_message(recipient, lines=10000, seed=15)
    reply = postfix.send('sender@example.org', [recipient], message)
    assert reply.code == 250, reply            # Postfix has it queued
    # the gate holds the message inside fuglu's scan: its spool file is there
    peers.wait_until(lambda: any(name.startswith('waiting-') for name in os.listdir(gatedir)),
                     60, what='the message held in the scan')
    assert len(spool_files(spooldir)) == 1
    open(os.path.join(gatedir, 'open'), 'w').close()   # the next fuglu lets it through
    restarted = kill_and_restart(fuglu, fuglu_factory, text)
    assert spool_files(spooldir) == []
    restarted.wait_log(r'removed 1 spool file\(s\)')
    # Postfix saw the connection break before a 250: it retries, and the message arrives
    postfix.flush()
    delivered = postfix.wait_delivered(recipient, timeout=60)
    assert_identical_apart_from_added_headers(message, delivered)
    peers.wait_until(lambda: spool_files(spooldir) == [], 10, what='the new spool file removed')
    wait_queue_empty(postfix)


def test_worker_killed_while_scanning_has_its_spool_file_removed_by_the_parent(
        postfix_factory, fuglu_factory, nobody_dirs):
    postfix = postfix_factory('afterqueue')
    spooldir = nobody_dirs('fuglu-spool-')
    gatedir = nobody_dirs('fuglu-gate-')
    fuglu = fuglu_factory(config(postfix, spooldir, gatedir), backend='process')
    recipient = unique('worker')
    message = big_message(recipient, lines=10000, seed=12)
    assert postfix.send('sender@example.org', [recipient], message).code == 250
    markers = peers.wait_until(lambda: [name for name in os.listdir(gatedir)
                                        if name.startswith('waiting-')], 60,
                               what='the message held in the scan')
    with open(os.path.join(gatedir, markers[0])) as marker:
        worker = int(marker.read().split()[1])
    assert worker != fuglu.pid and len(spool_files(spooldir)) == 1
    os.kill(worker, signal.SIGKILL)
    fuglu.wait_log(r'\(pid %d\) died \(killed by signal 9' % worker)
    fuglu.wait_log(r'removed 1 spool file\(s\)')
    open(os.path.join(gatedir, 'open'), 'w').close()   # the retry goes through
    postfix.flush()
    delivered = postfix.wait_delivered(recipient, timeout=60)
    assert_identical_apart_from_added_headers(message, delivered)
    peers.wait_until(lambda: spool_files(spooldir) == [], 10, what='the new spool file removed')
    wait_queue_empty(postfix)
