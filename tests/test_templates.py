"""apply_template: FuGlu's ${...} variables, safe substitution, header and
@tag lookups, caller values before the defaults."""

import re
import time
import tracemalloc

from helpers import fuglu

SOURCE = (b'From: Sender <sender@example.org>\r\n'
          b'To: rcpt@example.com\r\n'
          b'Subject: Quarterly report\r\n'
          b'X-Mailer: Tester 1.0\r\n'
          b'\r\n'
          b'Body text\r\n')


def make_suspect(**kwargs):
    return fuglu.Suspect('Jane.Doe@Example.org', ['first@dest.example', 'second@other.example'],
                         inbuffer=SOURCE, **kwargs)


def test_all_message_variables():
    suspect = make_suspect()
    text = fuglu.apply_template(
        'id=${id} from=${from_address} fd=${from_domain} fl=${from_localpart} to=${to_address} '
        'td=${to_domain} tl=${to_localpart} subject=${subject} ts=${timestamp}', suspect)
    assert text == ('id=%s from=Jane.Doe@Example.org fd=example.org fl=Jane.Doe '
                    'to=first@dest.example td=dest.example '
                    'tl=first subject=Quarterly report ts=%s' % (suspect.id, suspect.timestamp))


def test_date_and_time_are_local_now():
    suspect = make_suspect()
    before = time.localtime()
    text = fuglu.apply_template('${date} ${time}', suspect)
    after = time.localtime()
    date, clock = text.split(' ', 1)
    assert re.match(r'^\d{4}-\d{2}-\d{2}$', date)
    assert date in (time.strftime('%Y-%m-%d', before), time.strftime('%Y-%m-%d', after))
    assert clock in (time.strftime('%X', before), time.strftime('%X', after))


def test_names_without_braces():
    suspect = make_suspect()
    assert fuglu.apply_template('$from_address -> $to_address!', suspect) == \
        'Jane.Doe@Example.org -> first@dest.example!'
    # '.' belongs to names (${@a.b}), so a trailing dot makes another, unknown name
    assert fuglu.apply_template('to $to_address.', suspect) == 'to '


def test_double_dollar_is_a_literal_dollar():
    suspect = make_suspect()
    assert fuglu.apply_template('costs $$5 and $${id}', suspect) == 'costs $5 and ${id}'


def test_unknown_names_become_empty():
    suspect = make_suspect()
    assert fuglu.apply_template('[${nosuchvariable}][$alsonothing]', suspect) == '[][]'
    assert fuglu.apply_template('[${@nosuchtag}][${header:nothing}]', suspect) == '[][]'


def test_malformed_placeholders_stay_literal():
    suspect = make_suspect()
    for text in ('price 5$', '$1 and ${1x}', '${unclosed', '${}', '$ alone', '${with space}',
                 '${x-mailer}'):
        assert fuglu.apply_template(text, suspect) == text, text


def test_tag_lookup():
    suspect = make_suspect()
    suspect.set_tag('SAPlugin.report', 'score 3.1')
    suspect.tags['incomingport'] = 10099
    text = fuglu.apply_template('${@SAPlugin.report} on ${@incomingport}', suspect)
    assert text == 'score 3.1 on 10099'


def test_header_lookup():
    suspect = make_suspect()
    assert fuglu.apply_template('${header:subject}|${header:From}|${to}', suspect) == \
        'Quarterly report|Sender <sender@example.org>|rcpt@example.com'
    # a '-' is not part of a name: such headers cannot be referenced (as in FuGlu)
    assert fuglu.apply_template('${header:X-Mailer}', suspect) == '${header:X-Mailer}'


def test_subject_follows_the_current_source():
    suspect = make_suspect()
    suspect.set_header('Subject', '[SPAM] Quarterly report')
    assert fuglu.apply_template('${subject}', suspect) == '[SPAM] Quarterly report'


def test_values_override_defaults():
    suspect = make_suspect()
    values = {'id': 'OVERRIDDEN', 'subject': 'other', 'virusname': 'Eicar', 'empty': None}
    text = fuglu.apply_template('${id} ${subject} ${virusname} [${empty}] ${to_domain}', suspect,
                                values)
    assert text == 'OVERRIDDEN other Eicar [] dest.example'


def test_without_a_suspect():
    assert fuglu.apply_template('${a}-${b}-$$', None, {'a': 1, 'b': 'x'}) == '1-x-$'
    assert fuglu.apply_template(None, None) == ''
    assert fuglu.apply_template('no placeholders', None) == 'no placeholders'


def test_null_sender_and_no_recipient_parts_are_empty():
    suspect = fuglu.Suspect('', [], inbuffer=b'Subject: x\r\n\r\n')
    assert fuglu.apply_template('[${from_address}][${from_domain}][${to_address}][${to_domain}]',
                                suspect) == '[][][][]'


def test_log_format_variables():
    suspect = make_suspect()
    suspect.tags['spam']['SpamAssassin'] = True
    suspect.tags['decisions'].append(('SAPlugin', fuglu.REJECT))
    text = suspect.log_format('size=${size} spam=${spam} virus=${virus} modified=${modified} '
                              'decision=${decision}')
    assert text == 'size=%d spam=yes virus=no modified=no decision=REJECT' % len(SOURCE)
    assert make_suspect().log_format('${decision}') == 'DUNNO'


def test_inserted_values_are_never_expanded_again():
    """Subjects, headers, tags and caller values are sender text: inserted as they are."""
    source = b'Subject: ${id} $$ ${body:full}\r\nXname: ${from_address}\r\n\r\nbody\r\n'
    suspect = fuglu.Suspect('a@example.org', ['b@example.org'], inbuffer=source)
    suspect.set_tag('name', '${to_address}')
    text = fuglu.apply_template('${subject}|${header:xname}|${@name}|${value}', suspect,
                                {'value': '$$ ${date}'})
    assert text == '${id} $$ ${body:full}|${from_address}|${to_address}|$$ ${date}'


def test_output_is_bounded_and_each_variable_looked_up_once(monkeypatch):
    body = b'x' * 1000000
    suspect = fuglu.Suspect('a@example.org', ['b@example.org'],
                            inbuffer=b'Subject: s\r\n\r\n' + body)
    calls = []
    original = fuglu.SuspectFilter.field_values

    def counting(suspect, field):
        calls.append(field)
        return original(suspect, field)
    monkeypatch.setattr(fuglu.SuspectFilter, 'field_values', staticmethod(counting))
    tracemalloc.start()
    try:
        text = fuglu.apply_template('${body:full}' * 10000, suspect)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert calls == ['body:full']
    assert len(text) == fuglu.TEMPLATE_MAX_CHARS
    assert peak < 8 * len(body)
    assert fuglu.apply_template('${from_address} and more', suspect, limit=5) == 'a@exa'
    assert fuglu.apply_template('no variables at all', suspect, limit=2) == 'no'


def test_valuesfunction_is_called_per_variable_like_fuglu():
    seen = []

    def escape(values):
        seen.append(dict(values))
        return {name: (value or '').replace("'", "''") for name, value in values.items()}
    suspect = make_suspect()
    text = fuglu.apply_template("'${subject}' '${quote}' '${missing}'", suspect, {'quote': "it's"},
                                valuesfunction=escape)
    assert text == "'Quarterly report' 'it''s' ''"
    assert seen == [{'subject': 'Quarterly report'}, {'quote': "it's"}, {'missing': None}]
