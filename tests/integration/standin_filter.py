"""A tiny SMTP relay standing in for fuglu in the peer fixtures' self-tests.

Test helper only, not part of the product. It takes fuglu's command line (-f -c CONF),
reads [main] incomingport / outgoinghost / outgoingport, adds an X-Standin-Filter header
and relays each message, answering the client with the relay's own reply. That is enough
for Postfix's after-queue and before-queue wirings and for FugluProcess.
"""

import argparse
import configparser
import smtplib
import socketserver
import sys


class RelayHandler(socketserver.StreamRequestHandler):
    def reply(self, line):
        self.wfile.write(line.encode('utf-8') + b'\r\n')

    def handle(self):
        config = self.server.config
        sender, recipients, mail_options = None, [], []
        self.reply('220 standin.fuglu-peers.test ESMTP stand-in filter')
        for raw in self.rfile:
            command = raw.decode('utf-8', 'replace').strip()
            verb = command.split(' ', 1)[0].upper()
            if verb in ('EHLO', 'HELO'):
                self.reply('250-standin.fuglu-peers.test\r\n250-8BITMIME\r\n250 SMTPUTF8')
            elif verb == 'MAIL':
                words = command.split(':', 1)[1].split() if ':' in command else ['']
                sender = words[0].strip('<>')
                mail_options = [word for word in words[1:] if word.upper() == 'SMTPUTF8']
                recipients = []
                self.reply('250 2.1.0 Ok')
            elif verb == 'RCPT':
                recipients.append(command.split(':', 1)[1].split()[0].strip('<>'))
                self.reply('250 2.1.5 Ok')
            elif verb == 'DATA':
                self.reply('354 End data with <CR><LF>.<CR><LF>')
                body = []
                for line in self.rfile:
                    if line in (b'.\r\n', b'.\n'):
                        break
                    body.append(line[1:] if line.startswith(b'.') else line)
                message = b'X-Standin-Filter: passed\r\n' + b''.join(body)
                self.reply(self.relay(config, sender, recipients, message, mail_options))
            elif verb == 'QUIT':
                self.reply('221 2.0.0 Bye')
                return
            elif verb in ('RSET', 'NOOP'):
                sender, recipients = None, []
                self.reply('250 2.0.0 Ok')
            else:
                self.reply('502 5.5.2 Command not recognized')

    @staticmethod
    def relay(config, sender, recipients, message, mail_options):
        host = config.get('main', 'outgoinghost', fallback='127.0.0.1')
        port = config.getint('main', 'outgoingport')
        try:
            with smtplib.SMTP(host, port, timeout=30) as client:
                client.sendmail(sender, recipients, message, mail_options)
        except smtplib.SMTPResponseException as error:
            text = error.smtp_error.decode('utf-8', 'replace') if isinstance(
                error.smtp_error, bytes) else str(error.smtp_error)
            return '%d %s' % (error.smtp_code, text)
        except Exception as error:  # any failure is a temporary one for the client
            return '451 4.3.0 stand-in relay failed: %s' % error
        return '250 2.0.0 Ok: relayed by stand-in'


class ThreadedServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('-f', action='store_true')
    parser.add_argument('-c', required=True)
    options = parser.parse_args()
    config = configparser.ConfigParser()
    config.read(options.c)
    port = int(config.get('main', 'incomingport').split(',')[0].rsplit(':', 1)[-1])
    server = ThreadedServer(('127.0.0.1', port), RelayHandler)
    server.config = config
    sys.stderr.write('stand-in filter on port %d: Startup complete\n' % port)
    sys.stderr.flush()
    server.serve_forever()


if __name__ == '__main__':
    main()
