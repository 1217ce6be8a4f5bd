"""SuspectFilter rule files: the three line formats, numeric comparisons,
every field kind, matches() vs get_args(), lint and reloading."""

import os
import time

import pytest

from helpers import fuglu

PLAIN = (b'Received: from helo.example (rdns.example [192.0.2.10])\r\n\tby mx.example\r\n'
         b'From: Alice <alice@example.org>\r\n'
         b'To: bob@example.com\r\n'
         b'Subject: Hello World\r\n'
         b'X-Spam-Level: ****\r\n'
         b'X-Spam-Flag: YES\r\n'
         b'\r\n'
         b'The quick brown fox\r\njumps over the lazy dog.\r\n')

MULTIPART = (b'From: a@example.org\r\nTo: b@example.com\r\nSubject: parts\r\n'
             b'MIME-Version: 1.0\r\n'
             b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
             b'--XX\r\nContent-Type: text/html; charset=utf-8\r\n'
             b'Content-Transfer-Encoding: quoted-printable\r\n\r\n'
             b'<html><body><p>Caf=C3=A9 <b>special</b>\r\n'
             b'offer</p><script>hidden()</script></body></html>\r\n'
             b'--XX\r\nContent-Type: application/pdf; name="invoice.pdf"\r\n'
             b'Content-Disposition: attachment; filename="invoice.pdf"\r\n'
             b'Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n'
             b'--XX--\r\n')


def suspect_for(source=PLAIN, sender='alice@example.org',
                recipients=('bob@example.com', 'carol@other.example')):
    return fuglu.Suspect(sender, list(recipients), inbuffer=source)


@pytest.fixture
def rules(tmp_path):
    """rules('line', 'line', ...) -> a SuspectFilter on a new file with those lines."""
    def create(*lines):
        path = tmp_path / ('rules%d.regex' % len(list(tmp_path.iterdir())))
        path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
        return fuglu.SuspectFilter(str(path))
    return create


# -- line formats -------------------------------------------------------------------

def test_simple_format_is_case_insensitive(rules):
    flt = rules('Subject ^hello\\sworld$ simple-arg')
    assert flt.matches(suspect_for()) == (True, 'simple-arg')
    assert (flt.matches(suspect_for(PLAIN.replace(b'Hello World', b'HELLO WORLD')))
            == (True, 'simple-arg'))
    assert flt.matches(suspect_for(PLAIN.replace(b'Hello World', b'Goodbye'))) == (False, None)


def test_simple_format_dot_matches_newline_and_args_may_contain_spaces(rules):
    flt = rules('body:full fox..jumps this is the argument')
    assert flt.matches(suspect_for()) == (True, 'this is the argument')


def test_simple_format_without_args(rules):
    flt = rules('Subject hello')
    assert flt.matches(suspect_for()) == (True, None)


def test_slash_format_without_flags_is_case_sensitive(rules):
    flt = rules('Subject /hello/ lower', 'Subject /Hello World/ exact')
    assert flt.matches(suspect_for()) == (True, 'exact')
    assert flt.get_args(suspect_for()) == ['exact']


def test_slash_format_with_flags(rules):
    flt = rules('Subject /^hello world$/i with-i')
    assert flt.matches(suspect_for()) == (True, 'with-i')
    flt = rules('body:full /^jumps/ no-m', 'body:full /^jumps/m with-m')
    assert flt.get_args(suspect_for()) == ['with-m']


def test_slash_format_regex_with_spaces_and_escaped_slash(rules):
    flt = rules('Subject: /Hello World/', r'body:full /over the lazy\/dog/ never',
                r'X-Path /a\/b/ path')
    assert flt.matches(suspect_for()) == (True, None)
    source = PLAIN.replace(b'X-Spam-Flag: YES', b'X-Path: /x/a/b/')
    assert flt.get_args(suspect_for(source)) == [None, 'path']


def test_json_format(rules):
    flt = rules('{"field": "Subject", "regex": "^hello", "flags": "i", "args": "json-regex"}',
                '{"field": "Subject", "regex": "^hello", "args": "json-case"}',
                '{"field": "@score", "cmp": ">=", "num": "5", "args": {"action": "reject"}}')
    suspect = suspect_for()
    assert flt.get_args(suspect) == ['json-regex']
    suspect.tags['score'] = 7.5
    assert flt.get_args(suspect) == ['json-regex', {'action': 'reject'}]


def test_trailing_colon_comments_and_blank_lines(rules):
    flt = rules('# a comment', '', '   ', '  # indented comment', 'subject: world colon')
    assert len(flt.rules) == 1
    assert flt.matches(suspect_for()) == (True, 'colon')


# -- numeric comparisons ------------------------------------------------------------

@pytest.mark.parametrize('rule,value,expected', [
    ('>5', 7, True), ('>5', 5, False), ('>=5', 5, True), ('<5', 4.9, True), ('<5', 5, False),
    ('<=5', 5, True), ('=5', 5.0, True), ('==5', 6, False), ('!=5', 6, True), ('<>5', 5, False),
    ('>-1', 0, True), ('>2.5', 2.6, True), ('>2.5', 2.4, False),
    ('>5', 'not a number', False), ('>5', '10', True),
])
def test_numeric_comparison(rules, rule, value, expected):
    flt = rules('@score %s hit' % rule)
    suspect = suspect_for()
    suspect.tags['score'] = value
    assert flt.matches(suspect) == ((True, 'hit') if expected else (False, None))


def test_numeric_comparison_on_a_header(rules):
    flt = rules('X-Count >=10 many')
    assert flt.matches(suspect_for(b'X-Count: 12\r\n\r\nx')) == (True, 'many')
    assert flt.matches(suspect_for(b'X-Count: 9\r\n\r\nx')) == (False, None)


# -- fields -------------------------------------------------------------------------

def test_envelope_fields(rules):
    flt = rules('envelope_from ^alice@example\\.org$ from', 'envelope_to ^carol@ second-rcpt',
                'to_domain ^other\\.example$ first-rcpt-only',
                'from_domain ^example\\.org$ fromdom',
                'to_address ^bob@ to-alias', 'from_address ^alice to-from-alias')
    assert flt.get_args(suspect_for()) == ['from', 'second-rcpt', 'fromdom', 'to-alias',
                                           'to-from-alias']
    swapped = suspect_for(recipients=['carol@other.example', 'bob@example.com'])
    assert 'first-rcpt-only' in flt.get_args(swapped)


def test_header_fields_with_wildcard_and_multiple_values(rules):
    flt = rules('X-Spam-* ^YES$ wildcard', 'header:x-spam-level ^\\*{4}$ explicit',
                'Received mx\\.example received')
    assert flt.get_args(suspect_for()) == ['wildcard', 'explicit', 'received']
    flt = rules('Received ^second second-received')
    source = b'Received: first hop\r\nReceived: second hop\r\n\r\nbody'
    assert flt.matches(suspect_for(source)) == (True, 'second-received')


def test_tag_fields(rules):
    flt = rules('@incomingport ^10099$ outbound', '@is_spam ^True$ spam', '@is_spam ^False$ ham',
                '@SAPlugin.report BAYES report', '@nested.level ^deep$ nested',
                '@listtag ^two$ list')
    suspect = suspect_for()
    suspect.tags['incomingport'] = 10099
    suspect.tags['SAPlugin.report'] = 'BAYES_99 ...'
    suspect.tags['nested'] = {'level': 'deep'}
    suspect.tags['listtag'] = ['one', 'two']
    assert flt.get_args(suspect) == ['outbound', 'ham', 'report', 'nested', 'list']
    suspect.tags['spam']['SpamAssassin'] = True
    assert flt.get_args(suspect) == ['outbound', 'spam', 'report', 'nested', 'list']
    suspect.tags['incomingport'] = 10025
    assert 'outbound' not in flt.get_args(suspect)


def test_body_fields(rules):
    flt = rules(r'body Café\s+special\s+offer decoded', 'body hidden script',
                'body:raw <b>special</b> raw',
                'body:full Caf=C3=A9 full', 'body:full JVBERi0xLjQK attachment-bytes',
                'body:full ^From: header-in-full')
    assert flt.get_args(suspect_for(MULTIPART)) == ['decoded', 'raw', 'full', 'attachment-bytes',
                                                      'header-in-full']


def test_body_is_not_the_headers(rules):
    flt = rules('body Hello header-text', 'body lazy body-text')
    assert flt.get_args(suspect_for()) == ['body-text']


def test_mime_header_field(rules):
    flt = rules('mime:Content-Disposition invoice\\.pdf pdf', 'mime:content-type ^text/html html',
                'mime:Content-Disposition \\.exe$ exe')
    assert flt.get_args(suspect_for(MULTIPART)) == ['pdf', 'html']


def test_client_fields_from_received(rules):
    flt = rules('clientip ^192\\.0\\.2\\.10$ ip', 'clienthostname ^rdns\\.example$ rdns',
                'clienthelo ^helo\\. helo')
    assert flt.get_args(suspect_for()) == ['ip', 'rdns', 'helo']


# -- matches vs get_args ------------------------------------------------------------

def test_matches_returns_the_first_rule_in_file_order_get_args_all(rules):
    flt = rules('Subject world one', 'Subject nomatch two', 'Subject hello three',
                'From alice four')
    assert flt.matches(suspect_for()) == (True, 'one')
    assert flt.get_args(suspect_for()) == ['one', 'three', 'four']
    matched, result = flt.matches(suspect_for(), extended=True)
    # FuGlu's extended result: field name, the value that matched, argument, regex
    assert matched and result.fieldname == 'Subject' and result.arg == 'one'
    assert result.value == 'Hello World' and result.pattern == 'world'
    field, value, arg, regex = result       # older FuGlu's 4-tuple still unpacks
    assert (field, value, arg, regex) == ('Subject', 'Hello World', 'one', 'world')
    numeric = rules('@score >5 high').matches(suspect_for(), extended=True)
    assert numeric == (False, None)
    assert rules('Subject nothing x').get_args(suspect_for()) == []


# -- lint and reload ----------------------------------------------------------------

def test_lint_reports_unparsable_lines(rules, capsys):
    flt = rules('Subject hello fine', 'lonelyfield', 'Subject /unclosed(/ bad-regex',
                '{"field": "Subject"', 'Subject (unbalanced x')
    assert flt.lint() is False
    out = capsys.readouterr().out
    for lineno in (2, 3, 4, 5):
        assert '.regex line %d:' % lineno in out, out
    assert '.regex line 1:' not in out
    # the good rule still works
    assert flt.matches(suspect_for()) == (True, 'fine')
    assert rules('Subject hello fine').lint() is True


def test_lint_of_a_missing_file(tmp_path, capsys):
    flt = fuglu.SuspectFilter(str(tmp_path / 'absent.regex'))
    assert flt.lint() is False
    assert 'absent.regex' in capsys.readouterr().out
    assert flt.matches(suspect_for()) == (False, None)


def test_reload_when_the_file_changes(tmp_path):
    path = tmp_path / 'reload.regex'
    path.write_text('Subject hello before\n')
    flt = fuglu.SuspectFilter(str(path))
    assert flt.matches(suspect_for()) == (True, 'before')
    written = os.stat(str(path)).st_mtime
    path.write_text('Subject hello after\n')
    os.utime(str(path), (written + 1, written + 1))   # a later write, whatever the clock says
    assert flt.file_changed()
    # checked at most every RELOAD_CHECK_INTERVAL seconds: not yet
    assert flt.matches(suspect_for()) == (True, 'before')
    # once the interval has passed, the new rules apply
    flt._last_check -= flt.RELOAD_CHECK_INTERVAL + 1
    assert flt.matches(suspect_for()) == (True, 'after')
    assert not flt.file_changed()


def test_reload_picks_up_a_file_created_later(tmp_path):
    path = tmp_path / 'later.regex'
    flt = fuglu.SuspectFilter(str(path))
    assert flt.matches(suspect_for()) == (False, None)
    path.write_text('Subject hello created\n')
    flt._last_check = 0
    assert flt.matches(suspect_for()) == (True, 'created')
    os.unlink(str(path))
    flt._last_check = 0
    assert flt.matches(suspect_for()) == (False, None)


# -- time bound -------------------------------------------------------------------------

LONG_BODY = b'Subject: long\r\n\r\n' + b'a ' * 200000 + b'\r\n'


@pytest.fixture
def short_limit(monkeypatch):
    monkeypatch.setattr(fuglu.SuspectFilter, 'MATCH_TIME_LIMIT', 0.2)


def test_a_quadratic_rule_on_a_long_body_is_a_problem_not_a_miss(rules, short_limit, caplog):
    # '.*word' tries every start position to the end: hours on these 400 kB
    flt = rules('body .*word found', 'Subject long subject-rule')
    started = time.monotonic()
    with pytest.raises(fuglu.RuleTimeLimitExceeded):
        flt.matches(suspect_for(LONG_BODY))
    assert time.monotonic() - started < 10
    assert 'no answer within 0.2s on a 400002 character body value' in caplog.text
    assert issubclass(fuglu.RuleTimeLimitExceeded, fuglu.LimitExceeded)


def test_long_values_are_searched_whole(rules, short_limit):
    # no size cap: a word at the very end of a long body still matches
    flt = rules('body word\\s*$ found', 'body:full ^Subject:\\slong.*needle needle')
    assert flt.matches(suspect_for(LONG_BODY[:-2] + b'word\r\n')) == (True, 'found')
    assert flt.get_args(suspect_for(LONG_BODY + b'needle\r\n')) == ['needle']
    assert flt.matches(suspect_for(LONG_BODY)) == (False, None)


def test_the_time_limit_is_for_all_rules_of_one_call(rules, short_limit):
    # each rule costs some 50 ms on this header (searched in-process, it is short);
    # 300 of them would take 15 s
    flt = rules(*['X-Long x.*y%d no' % index for index in range(300)])
    source = b'X-Long: ' + b'x ' * 1900 + b'\r\nSubject: s\r\n\r\nbody\r\n'
    started = time.monotonic()
    with pytest.raises(fuglu.RuleTimeLimitExceeded):
        flt.get_args(suspect_for(source))
    assert time.monotonic() - started < 5
