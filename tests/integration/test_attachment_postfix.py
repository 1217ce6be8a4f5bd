"""Attachment blocker and archive through a real Postfix (after-queue content_filter).

Postfix -> fuglu (smtp connector; scanner attachment, appender archive) -> Postfix
re-injection port -> one Maildir; bounces go to the same re-injection port with the null
sender. fuglu's config folder has no rules/ and no templates/: the rule files and the
bounce template bundled with fuglu apply, as on a host that only has fuglu.pyz.
"""

import os
import re
import sys
import time
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers  # noqa: E402,F401  (the fixtures come from conftest.py)

PE_PROGRAM = (b'MZ\x90\x00\x03\x00\x00\x00' + b'\x00' * 52 + b'\x40\x00\x00\x00PE\x00\x00' + b'\x00'
              * 200)


def mail(sender, recipient, subject, attachment_name, attachment_data):
    message = MIMEMultipart()
    message['From'] = '<%s>' % sender
    message['To'] = '<%s>' % recipient
    message['Subject'] = subject
    message['Message-ID'] = '<%d.%s>' % (time.time_ns(), recipient)
    message.attach(MIMEText('please see the attachment'))
    part = MIMEApplication(attachment_data, 'octet-stream')
    part.add_header('Content-Disposition', 'attachment', filename=attachment_name)
    message.attach(part)
    return message.as_bytes().replace(b'\n', b'\r\n')


@pytest.fixture
def blocking_chain(postfix_factory, fuglu_factory, tmp_world_dir):
    postfix = postfix_factory('afterqueue')
    archive_dir = os.path.join(tmp_world_dir, 'archive')
    os.mkdir(archive_dir)
    os.chown(archive_dir, peers.pwd.getpwnam('nobody').pw_uid, -1)  # fuglu runs as nobody
    rules = os.path.join(tmp_world_dir, 'archive-blocked.regex')
    with open(rules, 'w') as handle:
        handle.write('@archive.blocked True yes\n')
    config = ('[main]\n'
              'incomingport = smtp:127.0.0.1:%d\n'
              'outgoinghost = 127.0.0.1\n'
              'outgoingport = %d\n'
              'plugins = attachment\n'
              'prependers =\n'
              'appenders = archive\n'
              'controlport = %s\n'
              '[performance]\nminthreads = 2\nmaxthreads = 10\n'
              '[FiletypePlugin]\nsendbounce = True\nblockaction = DELETE\n'
              '[ArchivePlugin]\narchiverules = %s\nlocal_archivedir = %s\n'
              'local_subdirtemplate = blocked/${to_localpart}\n'
              % (postfix.filter_port, postfix.reinject_port,
                 os.path.join(tmp_world_dir, 'control.sock'),
                 rules, archive_dir))
    fuglu_process = fuglu_factory(config, workdir=tmp_world_dir)
    return postfix, fuglu_process, archive_dir


def test_blocked_attachment_is_not_delivered_and_the_sender_gets_a_bounce(blocking_chain):
    postfix, fuglu_process, archive_dir = blocking_chain
    reply = postfix.send('sender@example.org', ['blocked@example.net'],
                         mail('sender@example.org', 'blocked@example.net', 'quarterly numbers',
                              'numbers.exe', PE_PROGRAM))
    assert reply.code == 250, reply
    fuglu_process.wait_log(r'numbers\.exe: Dangerous attachment type \(exe\)', timeout=30)

    bounce = postfix.wait_delivered('sender@example.org', timeout=30)
    assert re.search(rb'(?im)^Return-Path: <>\r?$', bounce), bounce[:500]
    assert re.search(rb'(?im)^Auto-Submitted: auto-generated', bounce)
    import email
    body = email.message_from_bytes(bounce).get_payload(decode=True).decode('utf-8')
    assert 'numbers.exe: Dangerous attachment type (exe)' in body
    assert 'quarterly numbers' in body

    # a clean message sent afterwards arrives, the blocked one never does
    postfix.send('sender@example.org', ['clean@example.net'],
                 mail('sender@example.org', 'clean@example.net', 'photo', 'photo.png',
                      b'\x89PNG\r\n\x1a\n' + b'\x00' * 64))
    postfix.wait_delivered('clean@example.net', timeout=30)
    assert postfix.delivered('blocked@example.net') == []
    assert postfix.queue_size() == 0

    # the appender archived the blocked message, and only that one
    archived = []
    for folder, _dirs, names in os.walk(archive_dir):
        archived.extend(os.path.join(folder, name) for name in names)
    assert len(archived) == 1
    assert os.path.dirname(archived[0]) == os.path.join(archive_dir, 'blocked', 'blocked')
    with open(archived[0], 'rb') as handle:
        assert b'filename="numbers.exe"' in handle.read()


def test_executable_renamed_to_txt_is_not_delivered(blocking_chain):
    postfix, fuglu_process, _archive_dir = blocking_chain
    reply = postfix.send('sender@example.org', ['renamed@example.net'],
                         mail('sender@example.org', 'renamed@example.net', 'invoice', 'invoice.txt',
                              PE_PROGRAM))
    assert reply.code == 250, reply
    fuglu_process.wait_log(r'invoice\.txt application/x-dosexec: No programs allowed', timeout=30)
    postfix.wait_delivered('sender@example.org', timeout=30)  # the bounce
    postfix.send('sender@example.org', ['after@example.net'],
                 mail('sender@example.org', 'after@example.net', 'after', 'notes.txt',
                      b'plain words\r\n'))
    postfix.wait_delivered('after@example.net', timeout=30)
    assert postfix.delivered('renamed@example.net') == []


def raw_mail(sender, recipient, subject, *parts):
    """A multipart message from raw parts, written byte by byte (8-bit names, odd MIME)."""
    head = ('From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-ID: <%d.%s>\r\nMIME-Version: 1.0\r\n'
            'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            % (sender, recipient, subject, time.time_ns(), recipient)).encode()
    return head + b''.join(b'--b\r\n' + part + b'\r\n' for part in parts) + b'--b--\r\n'


TEXT_PART = b'Content-Type: text/plain\r\n\r\nplease see the attachment\r\n'


def base64_part(header, data):
    import base64
    return (header + b'Content-Transfer-Encoding: base64\r\n\r\n'
            + base64.encodebytes(data).replace(b'\n', b'\r\n'))


def test_issue9_examples_through_postfix(blocking_chain):
    """A raw UTF-8 file name is delivered (it was deferred on every retry); an exe
    behind a line that only starts like the closing boundary is blocked; a file name
    shaped like a template reaches the bounce as it is."""
    postfix, fuglu_process, _archive_dir = blocking_chain
    pdf = base64_part('Content-Type: application/pdf\r\nContent-Disposition: attachment; '
                      'filename="Rechnung M\u00e4rz.pdf"\r\n'.encode('utf-8'), b'%PDF-1.4\n%%EOF\n')
    reply = postfix.send('sender@example.org', ['utf8@example.net'],
                         raw_mail('sender@example.org', 'utf8@example.net', 'invoice', TEXT_PART,
                                  pdf))
    assert reply.code == 250, reply
    delivered = postfix.wait_delivered('utf8@example.net', timeout=30)
    assert 'Rechnung M\u00e4rz.pdf'.encode('utf-8') in delivered

    exe = base64_part(b'Content-Type: application/octet-stream; '
                      b'name="${id}${@archived.result}.exe"\r\n', PE_PROGRAM)
    reply = postfix.send('sender@example.org', ['hidden@example.net'],
                         raw_mail('sender@example.org', 'hidden@example.net', 'hidden',
                                  TEXT_PART + b'--b--not the end\r\n', exe))
    assert reply.code == 250, reply
    fuglu_process.wait_log(r'\$\{id\}\$\{@archived\.result\}\.exe: Dangerous attachment type '
                           r'\(exe\)', timeout=30)
    bounce = postfix.wait_delivered('sender@example.org', timeout=30)
    import email
    body = email.message_from_bytes(bounce).get_payload(decode=True).decode('utf-8')
    assert '${id}${@archived.result}.exe: Dangerous attachment type (exe)' in body
    postfix.send('sender@example.org', ['after9@example.net'],
                 mail('sender@example.org', 'after9@example.net', 'after', 'notes.txt',
                      b'plain words\r\n'))
    postfix.wait_delivered('after9@example.net', timeout=30)
    assert postfix.delivered('hidden@example.net') == []
