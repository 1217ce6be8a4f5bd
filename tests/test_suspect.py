"""The Suspect and the action codes."""

import email
import email.policy
import random
import re
import time

import pytest

from helpers import fuglu, make_config

SOURCE = (b'Received: from client.example (client.example [203.0.113.5])\r\n'
          b'\tby mx.example (Postfix) with ESMTP id 4XyZ\r\n'
          b'From: Alice <alice@example.org>\r\n'
          b'To: bob@example.com\r\n'
          b'Subject:   Greetings\r\n'
          b'X-Old: one\r\n'
          b'X-Folded: first part\r\n'
          b' second part\r\n'
          b'X-Old: two\r\n'
          b'\r\n'
          b'Body line 1\r\n'
          b'X-Old: not a header, body text\r\n')


def make_suspect(source=SOURCE, sender='alice@example.org', recipients=('bob@example.com',),
                 **kwargs):
    return fuglu.Suspect(sender, list(recipients), inbuffer=source, **kwargs)


def header_block(data):
    return data.split(b'\r\n\r\n', 1)[0]


def parsed(data):
    return email.message_from_bytes(data, policy=email.policy.compat32)


# -- ids and addresses --------------------------------------------------------------

def test_id_is_32_lowercase_hex_and_unique():
    ids = {make_suspect().id for _ in range(50)}
    assert len(ids) == 50
    for suspect_id in ids:
        assert re.match(r'^[0-9a-f]{32}$', suspect_id)
    assert (make_suspect(id='0123456789abcdef0123456789abcdef').id
            == '0123456789abcdef0123456789abcdef')


def test_address_parts():
    suspect = make_suspect(sender='Jane.Doe@example.org',
                           recipients=['first@dest.example', 'second@other.example'])
    assert (suspect.from_localpart, suspect.from_domain) == ('Jane.Doe', 'example.org')
    assert suspect.to_address == 'first@dest.example'
    assert (suspect.to_localpart, suspect.to_domain) == ('first', 'dest.example')
    assert suspect.recipients == ['first@dest.example', 'second@other.example']


def test_address_split_at_the_last_at_sign_and_whitespace_stripped():
    fuglu.Addrcheck().set('LazyLocalPart')   # a quoted local part may hold an @
    try:
        suspect = make_suspect(sender=' "odd@local"@example.org ', recipients=[' postmaster '])
    finally:
        fuglu.Addrcheck().set('Default')
    assert suspect.from_address == '"odd@local"@example.org'
    assert suspect.from_localpart == '"odd@local"'
    assert suspect.from_domain == 'example.org'
    assert suspect.to_address == 'postmaster'
    assert suspect.to_domain == ''


def test_null_sender_and_no_recipients():
    suspect = make_suspect(sender='', recipients=[])
    assert suspect.from_address == ''
    assert (suspect.from_localpart, suspect.from_domain) == ('', '')
    assert suspect.to_address is None
    assert suspect.to_domain == ''


def test_assigning_to_address_sets_the_recipient_list():
    suspect = make_suspect(recipients=['a@x.example', 'b@x.example'])
    suspect.to_address = 'c@y.example'
    assert suspect.recipients == ['c@y.example']
    assert suspect.orig_recipients_changed()
    assert not suspect.orig_from_address_changed()
    suspect.from_address = 'other@example.org'
    assert suspect.orig_from_address_changed()


def test_source_from_a_file(tmp_path):
    path = tmp_path / 'message.eml'
    path.write_bytes(SOURCE)
    suspect = fuglu.Suspect('a@example.org', 'b@example.com', str(path))
    assert suspect.get_source() == SOURCE
    assert suspect.recipients == ['b@example.com']
    assert suspect.size == len(SOURCE)


def test_str():
    suspect = make_suspect()
    text = str(suspect)
    assert text.startswith('Suspect %s: from=alice@example.org to=bob@example.com size=%d'
                           % (suspect.id, len(SOURCE)))


# -- headers ------------------------------------------------------------------------

def test_get_header():
    suspect = make_suspect()
    assert suspect.get_header('subject') == 'Greetings'
    assert suspect.get_header('X-Old') == 'one'
    assert suspect.get_header('X-Missing') is None
    assert suspect.get_header('X-Missing', 'fb') == 'fb'
    assert suspect.get_all_headers('x-old') == ['one', 'two']
    assert 'X-Folded: first part' in suspect.get_headers()
    assert 'Body line' not in suspect.get_headers()


def test_add_header_for_delivery_leaves_the_source_alone():
    suspect = make_suspect()
    suspect.add_header('X-First', 'value 1')
    suspect.add_header('X-Second', 'value 2')
    suspect.add_header('X-First', 'value 3')  # one value per name, the newest wins
    assert suspect.get_source() == SOURCE
    assert not suspect.is_modified()
    assert suspect.get_header('X-First') is None
    assert suspect.addheaders == {'X-First': 'value 3', 'X-Second': 'value 2'}
    assert suspect.get_output_source() == b'X-First: value 3\r\nX-Second: value 2\r\n' + SOURCE


def test_add_header_immediate_is_visible_at_once():
    suspect = make_suspect()
    suspect.get_header('subject')            # fill the header cache first
    suspect.get_message_rep()
    suspect.add_header('X-Now', 'seen', immediate=True)
    assert suspect.get_source() == b'X-Now: seen\r\n' + SOURCE
    assert suspect.get_header('X-Now') == 'seen'
    assert suspect.get_message_rep()['X-Now'] == 'seen'
    assert suspect.added_headers == {'X-Now': 'seen'}
    assert suspect.addheaders == {}
    assert suspect.get_original_source() == SOURCE


@pytest.mark.parametrize('immediate', [False, True])
def test_header_injection_is_encoded(immediate):
    suspect = make_suspect()
    evil = 'innocent\r\nBcc: victim@example.net\r\n\r\nInjected body'
    suspect.add_header('X-Report', evil, immediate=immediate)
    output = suspect.get_output_source()
    head = header_block(output)
    assert not re.search(rb'^Bcc:', head, re.MULTILINE | re.IGNORECASE)
    assert output.endswith(SOURCE)
    added = head[:len(head) - len(header_block(SOURCE))]
    assert b'\n\r\n' not in added and b'\n\n' not in added
    assert all(line.startswith((b'X-Report:', b' ', b'\t'))
               for line in added.split(b'\r\n') if line)
    message = parsed(output)
    assert message.get_all('Bcc') is None
    assert message['Subject'].strip() == 'Greetings'
    from email.header import decode_header, make_header
    # the text survives (its line breaks may become blanks), but as one header value
    decoded = str(make_header(decode_header(message['X-Report'])))
    assert decoded.split() == evil.split()


@pytest.mark.parametrize('value', ['a\nBcc: x@example.net', 'a\rBcc: x@example.net'])
def test_bare_cr_or_lf_in_a_value_is_encoded_too(value):
    suspect = make_suspect()
    suspect.add_header('X-Bare', value)
    added = suspect.build_headers()
    lines = added.split(b'\r\n')
    assert lines[-1] == b''
    for line in lines[:-1]:
        assert b'\r' not in line and b'\n' not in line
        assert line.startswith((b'X-Bare: ', b' ', b'\t')), added
    assert parsed(added + b'\r\n').get_all('Bcc') is None


def test_non_ascii_header_value_is_rfc2047_encoded():
    suspect = make_suspect()
    suspect.add_header('X-Greeting', 'Grüße aus Zürich')
    added = suspect.build_headers()
    assert added.isascii() if hasattr(added, 'isascii') else all(b < 128 for b in added)
    from email.header import decode_header, make_header
    value = parsed(added + b'\r\n')['X-Greeting']
    assert str(make_header(decode_header(value))) == 'Grüße aus Zürich'


@pytest.mark.parametrize('immediate', [False, True])
def test_8bit_envelope_text_in_a_header_is_encoded_not_a_crash(immediate):
    # '\udcff' is how the byte 0xff of MAIL FROM:<\xff\xc3\xa4@...> is kept: a header with
    # it (debuginfoheader, or a plugin's X-Envelope-From) made every delivery a 451
    suspect = make_suspect()
    suspect.add_header('X-Envelope-From', '\udcff\udcc3\udca4@example.org', immediate=immediate)
    output = suspect.get_output_source()
    from email.header import decode_header, make_header
    value = parsed(output)['X-Envelope-From']
    assert str(make_header(decode_header(value))) == '\ufffd\u00e4@example.org'
    assert output.endswith(SOURCE) and output.isascii()


def test_set_header_replaces_every_instance():
    suspect = make_suspect()
    suspect.set_header('X-Old', 'replaced')
    source = suspect.get_source()
    assert suspect.get_all_headers('X-Old') == ['replaced']
    assert source.count(b'X-Old: replaced\r\n') == 1
    assert b'X-Old: one' not in source and b'X-Old: two' not in source
    assert source.endswith(b'\r\nBody line 1\r\nX-Old: not a header, body text\r\n')
    assert suspect.modified_headers == {'X-Old': 'replaced'}
    assert suspect.is_modified()


def test_set_header_adds_a_missing_header():
    suspect = make_suspect()
    suspect.set_header('X-New', 'fresh')
    assert suspect.get_source() == b'X-New: fresh\r\n' + SOURCE
    assert suspect.get_header('x-new') == 'fresh'


def test_remove_the_last_header_of_the_block():
    suspect = make_suspect(b'A: 1\r\nX-Last: 2\r\n\r\nbody\r\n')
    assert suspect.remove_headers('X-Last') is True
    assert suspect.get_source() == b'A: 1\r\n\r\nbody\r\n'


def test_remove_headers_with_folded_lines_keeps_the_body():
    suspect = make_suspect()
    assert suspect.remove_headers('x-folded') is True
    assert suspect.remove_headers('X-Old') is True
    assert suspect.remove_headers('X-Never') is False
    source = suspect.get_source()
    assert b'second part' not in source
    assert b'X-Old' not in header_block(source)
    assert source.endswith(b'\r\n\r\nBody line 1\r\nX-Old: not a header, body text\r\n')
    assert suspect.get_header('Subject') == 'Greetings'
    # as in FuGlu: name -> the values removed
    assert sorted(suspect.removed_headers) == ['X-Old', 'x-folded']
    assert len(suspect.removed_headers['X-Old']) == 2
    assert 'second part' in suspect.removed_headers['x-folded'][0]


def test_update_subject_keeps_the_original_in_a_tag():
    suspect = make_suspect()
    assert suspect.update_subject(lambda subject, prefix: prefix + subject, prefix='[SPAM] ')
    assert suspect.get_header('Subject') == '[SPAM] Greetings'
    assert suspect.get_tag('origsubj') == 'Greetings'
    assert not suspect.update_subject(lambda subject: subject)


# -- source and parsed message ------------------------------------------------------

def test_get_and_set_source():
    suspect = make_suspect()
    assert suspect.get_source(maxbytes=10) == SOURCE[:10]
    assert suspect.get_original_source(maxbytes=8) == SOURCE[:8]
    first_rep = suspect.get_message_rep()
    suspect.set_source(b'Subject: replaced\r\n\r\nnew body\r\n')
    assert suspect.is_modified()
    assert suspect.get_source() == b'Subject: replaced\r\n\r\nnew body\r\n'
    assert suspect.size == len(b'Subject: replaced\r\n\r\nnew body\r\n')
    assert suspect.get_original_source() == SOURCE
    assert suspect.get_header('subject') == 'replaced'
    assert suspect.get_message_rep() is not first_rep
    assert suspect.get_message_rep()['Subject'] == 'replaced'
    suspect.set_source('Subject: text\r\n\r\nstr works too\r\n')
    assert suspect.get_source() == b'Subject: text\r\n\r\nstr works too\r\n'


def test_get_message_rep_is_cached_compat32():
    suspect = make_suspect()
    message = suspect.get_message_rep()
    assert message is suspect.get_message_rep()
    assert message.policy == email.policy.compat32
    assert message['From'] == 'Alice <alice@example.org>'


def test_mime_parameters_are_split_as_the_email_package_splits_them():
    rng = random.Random(9)
    tokens = ['a', 'B', '"', '\\', '\\"', ';', ';', '=', ' ', '\t', 'name*0', 'name*1*',
              "utf-8''%41", 'charset', '*', '\u00e4', '(c)']
    for _ in range(3000):
        value = 'text/plain' + ''.join(rng.choice(tokens) for _ in range(rng.randrange(30)))
        source = b'Content-Type: ' + value.encode() + b'\r\n\r\nbody\r\n'
        stock = email.message_from_bytes(source, policy=email.policy.compat32)
        ours = fuglu.parse_message(source)
        assert type(stock) is not type(ours)
        for unquote in (True, False):
            assert ours.get_params(unquote=unquote) == stock.get_params(unquote=unquote), value
        assert ours.get_filename() == stock.get_filename(), value


def test_a_content_type_full_of_semicolons_is_parsed_in_linear_time():
    # the email package's splitter is quadratic: 13 s for 160 KB, minutes for a MB
    header = b'Content-Type: multipart/mixed; boundary="b"; x="' + b'a;' * 150000 + b'"\r\n'
    body = (b'\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n'
            b'Content-Type: application/pdf; name="' + b'a;' * 150000 + b'.pdf"\r\n\r\n'
            b'%PDF\r\n--b--\r\n')
    suspect = fuglu.Suspect('a@example.org', ['b@example.com'], inbuffer=header + body)
    started = time.process_time()
    assert suspect.get_message_rep().get_boundary() == 'b'
    stripped = suspect.source_stripped_attachments(maxsize=10000000)
    assert suspect.build_headeronly_message_rep().get_boundary() == 'b'
    assert time.process_time() - started < 2.0
    assert b'hi\r\n' in stripped and b'%PDF' not in stripped


@pytest.mark.parametrize('source', [
    b'Content-Type: multipart/mixed; boundary=b\n\n' + b'--b\n\n' * 20000,   # 100 KB
    b'a: b\n' * 200000 + b'\nbody\n',
], ids=['parts', 'header fields'])
def test_what_the_email_package_builds_for_a_message_is_bounded(source):
    # 10 MB of empty parts were 2 million objects: 640 MB and 12 s (spamd's copy of an
    # oversize message is made this way); a bound hit is a problem for the scanner
    suspect = fuglu.Suspect('a@example.org', ['b@example.com'], inbuffer=source)
    with pytest.raises(fuglu.LimitExceeded):
        suspect.get_message_rep()
    with pytest.raises(fuglu.LimitExceeded):
        suspect.source_stripped_attachments(maxsize=1000)
    many = b'Content-Type: multipart/mixed; boundary=b\n\n' + b'--b\n\n' * 9000
    message = fuglu.parse_message(many)
    assert len(message.get_payload()) == 9000   # each parse has its own budget ...
    assert [type(message)() for _ in range(fuglu.EMAIL_MAX_PARTS + 1)]   # ... a plugin none


def test_set_message_rep_reserialises_with_crlf():
    suspect = make_suspect()
    message = suspect.get_message_rep()
    message.replace_header('Subject', 'Changed')
    message['X-Added'] = 'yes'
    suspect.set_message_rep(message)
    source = suspect.get_source()
    assert suspect.is_modified()
    assert b'Subject: Changed\r\n' in source
    assert b'X-Added: yes\r\n' in source
    assert b'\n' not in source.replace(b'\r\n', b'')
    assert source.endswith(b'Body line 1\r\nX-Old: not a header, body text\r\n')
    assert suspect.get_header('X-Added') == 'yes'
    assert suspect.get_original_source() == SOURCE


def test_reinjectoriginal_delivers_the_received_bytes():
    suspect = make_suspect()
    suspect.add_header('X-Tag', 'v')
    suspect.set_source(b'Subject: changed\r\n\r\n')
    suspect.tags['reinjectoriginal'] = True
    assert suspect.get_output_source() == SOURCE


def test_client_info_from_received_or_connector():
    assert make_suspect().get_client_info() == ('client.example', '203.0.113.5', 'client.example')
    info = ('helo.example', '198.51.100.1', 'rdns.example')
    assert make_suspect(clientinfo=info).get_client_info() == info
    assert make_suspect(b'Subject: none\r\n\r\n').get_client_info() is None


# -- status -------------------------------------------------------------------------

def test_status_flags():
    suspect = make_suspect()
    assert suspect.is_ham()
    assert not (suspect.is_spam() or suspect.is_virus() or suspect.is_blocked() or
                suspect.is_highspam())
    suspect.tags['spam']['EngineA'] = False
    assert not suspect.is_spam() and suspect.is_ham()
    suspect.tags['spam']['EngineB'] = True
    assert suspect.is_spam() and not suspect.is_ham()
    other = make_suspect()
    other.tags['virus']['ClamAV'] = True
    assert other.is_virus() and not other.is_ham() and not other.is_spam()
    blocked = make_suspect()
    blocked.tags['blocked']['FiletypePlugin'] = True
    assert blocked.is_blocked() and not blocked.is_ham()
    high = make_suspect()
    high.tags['highspam']['SA'] = True
    assert high.is_highspam() and not high.is_ham()
    listed = make_suspect()
    listed.tags['welcomelisted']['x'] = True
    assert listed.is_welcomelisted() and listed.is_ham()
    assert suspect.get_status() == {'is_spam': True, 'is_highspam': False, 'is_virus': False,
                                    'is_blocked': False, 'is_welcomelisted': False,
                                    'is_blocklisted': False, 'is_ham': False}


def test_tags():
    suspect = make_suspect()
    assert suspect.get_tag('nothing') is None
    assert suspect.get_tag('nothing', 'dflt') == 'dflt'
    suspect.set_tag('key', [1])
    assert suspect.get_tag('key') == [1]
    for name in ('virus', 'spam', 'highspam', 'blocked'):
        assert suspect.tags[name] == {}
    assert suspect.tags['decisions'] == [] and suspect.tags['processingerrors'] == []


def test_debug_writes_only_when_debugging(tmp_path):
    suspect = make_suspect()
    suspect.debug('not written anywhere')
    path = tmp_path / 'debug.log'
    with open(str(path), 'w') as handle:
        suspect.tags['debug'] = True
        suspect.tags['debugfile'] = handle
        suspect.debug('visible line')
    text = path.read_text()
    assert re.match(r'^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z visible line\n$', text), text


def test_sa_temp_headers_strip_control_characters():
    suspect = make_suspect()
    suspect.write_sa_temp_header('X-Fuglu-Test', 'a\r\nb\x00c')
    headers = suspect.get_sa_temp_headers()
    assert headers == b'X-Fuglu-Test: abc\r\n'   # removed, as FuGlu does


# -- action codes -------------------------------------------------------------------

def test_action_constants():
    assert (fuglu.DUNNO, fuglu.ACCEPT, fuglu.DELETE, fuglu.REJECT, fuglu.DEFER) == (0, 1, 2, 3, 4)


@pytest.mark.parametrize('text,code', [
    ('DUNNO', 0), ('accept', 1), (' Delete ', 2), ('REJECT', 3), ('defer', 4),
    ('DISCARD', 2), ('discard', 2), ('bogus', None), ('', None), (None, None),
    ('DEFAULTVIRUSACTION', None),  # needs a config
])
def test_string_to_actioncode(text, code):
    assert fuglu.string_to_actioncode(text) == code


def test_pseudo_actions_resolve_through_the_config():
    config = make_config('[main]\n')
    assert fuglu.string_to_actioncode('DEFAULTVIRUSACTION', config) == fuglu.DELETE
    assert fuglu.string_to_actioncode('defaultlowspamaction', config) == fuglu.DUNNO
    config = make_config('[spam]\ndefaultlowspamaction = discard\ndefaulthighspamaction = Reject\n'
                         '[virus]\ndefaultvirusaction = defer\n')
    assert fuglu.string_to_actioncode('DEFAULTLOWSPAMACTION', config) == fuglu.DELETE
    assert fuglu.string_to_actioncode('DEFAULTHIGHSPAMACTION', config) == fuglu.REJECT
    assert fuglu.string_to_actioncode(' DefaultVirusAction ', config) == fuglu.DEFER
    config = make_config('[virus]\ndefaultvirusaction = nonsense\n')
    assert fuglu.string_to_actioncode('DEFAULTVIRUSACTION', config) is None


def test_actioncode_to_string():
    assert [fuglu.actioncode_to_string(code) for code in range(5)] == [
        'DUNNO', 'ACCEPT', 'DELETE', 'REJECT', 'DEFER']
    assert fuglu.actioncode_to_string(None) == 'NULL ACTION CODE'
    assert fuglu.actioncode_to_string(99) == 'INVALID ACTION CODE 99'
    for code in range(5):
        assert fuglu.string_to_actioncode(fuglu.actioncode_to_string(code)) == code


def test_client_info_costs_linear_time_on_a_nested_received_header():
    # 'from a (from a (...' made the old open-ended search quadratic: minutes
    # for this header; anchored and bounded it is a single short match attempt
    hostile = b'Received: ' + b'from a (' * 100000 + b'\r\n'
    honest = b'Received: from helo.example (rdns.example [IPv6:2001:db8::5])\r\n\tby mx.example\r\n'
    started = time.monotonic()
    suspect = make_suspect(hostile + honest + b'Subject: x\r\n\r\nbody\r\n')
    # FuGlu's rule: an unparsable Received header ends the search, unless skiponerror
    assert suspect.get_client_info() is None
    assert suspect.client_info_from_rcvd(skiponerror=True) == ('helo.example', '2001:db8::5',
                                                               'rdns.example')
    assert time.monotonic() - started < 5


def test_every_tag_the_core_uses_is_in_the_documented_table():
    import inspect
    source = inspect.getsource(fuglu)
    used = set(re.findall(r"tags(?:\[|\.get\(|\.pop\(|\.setdefault\()'([^']+)'", source))
    used |= set(re.findall(r"(?:get_tag|set_tag)\('([^']+)'", source))
    assert used, 'the pattern finds nothing: the test would pass vacuously'
    # '<plugin>.<what>' are the plugins' own (set by the helpers of the plugin bases);
    # 'skipmplugins' is a milter session's tag, not a Suspect's
    used = {name for name in used if not name.startswith('%s.')} - {'skipmplugins'}
    assert sorted(used - set(fuglu.SUSPECT_TAGS)) == []
    suspect = fuglu.Suspect('a@example.org', ['b@example.com'], inbuffer=b'x')
    assert set(suspect.tags) <= set(fuglu.SUSPECT_TAGS)
    assert {who for who, _what in fuglu.SUSPECT_TAGS.values()} == {'core', 'plugins'}
