-- miltertest script: drives fuglu's milter connector through whole messages.
-- Run: miltertest -D port=PORT -s milter_whole_message.lua  (exit 0 = every check passed)
-- fuglu runs with milter_mode=auto and the plugin milter_test_plugins.HeaderDriven.

local conn = mt.connect("inet:" .. port .. "@127.0.0.1", 20, 0.25)
if conn == nil then error("cannot connect to fuglu on port " .. port) end

-- Postfix 3.x offers version 6, all actions and all protocol steps (the nil defaults)
local err = mt.negotiate(conn, nil, nil, nil)
if err ~= nil then error("negotiate: " .. err) end
if not mt.test_action(conn, SMFIF_ADDHDRS) then error("ADDHDRS not requested") end
if mt.test_action(conn, SMFIF_QUARANTINE) then error("QUARANTINE requested but never used") end
if not mt.test_option(conn, SMFIP_NR_HDR) then error("NR_HDR not requested") end

mt.macro(conn, SMFIC_CONNECT, "j", "mx.fuglu-peers.test", "{daemon_name}", "smtpd")
if mt.conninfo(conn, "client.example.org", "192.0.2.44") ~= nil then error("conninfo") end
if mt.helo(conn, "client.example.org") ~= nil then error("helo") end

-- message 1: clean, gets fuglu's headers
mt.macro(conn, SMFIC_MAIL, "i", "4MTEST1")
if mt.mailfrom(conn, "<sender@example.org>") ~= nil then error("mailfrom") end
if mt.rcptto(conn, "<rcpt@example.net>") ~= nil then error("rcptto") end
if mt.header(conn, "From", "sender@example.org") ~= nil then error("header") end
if mt.header(conn, "Subject", "miltertest one") ~= nil then error("header") end
if mt.eoh(conn) ~= nil then error("eoh") end
if mt.bodystring(conn, "first message\r\n") ~= nil then error("body") end
if mt.eom(conn) ~= nil then error("eom") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error("message 1: not CONTINUE") end
if not mt.eom_check(conn, MT_HDRADD, "X-Fuglu-Spamstatus", " NO") then error("no X-Fuglu-Spamstatus: NO") end
if not mt.eom_check(conn, MT_HDRADD, "X-Fuglu-Suspect") then error("no X-Fuglu-Suspect") end
if mt.eom_check(conn, MT_BODYCHANGE) then error("message 1: body changed") end
local first_id = mt.getheader(conn, "X-Fuglu-Suspect", 0)

-- message 2 on the same connection: a plugin changes the body, then a third is rejected
mt.macro(conn, SMFIC_MAIL, "i", "4MTEST2")
if mt.mailfrom(conn, "<sender@example.org>") ~= nil then error("mailfrom 2") end
if mt.rcptto(conn, "<rcpt@example.net>") ~= nil then error("rcptto 2") end
if mt.header(conn, "Subject", "miltertest two") ~= nil then error("header 2") end
if mt.header(conn, "X-Test-Body", "replaced by fuglu") ~= nil then error("header 2") end
if mt.eoh(conn) ~= nil then error("eoh 2") end
if mt.bodystring(conn, "second message\r\n") ~= nil then error("body 2") end
if mt.eom(conn) ~= nil then error("eom 2") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error("message 2: not CONTINUE") end
if not mt.eom_check(conn, MT_BODYCHANGE, "replaced by fuglu\r\n") then error("message 2: body not replaced") end
if mt.getheader(conn, "X-Fuglu-Suspect", 0) == first_id then error("message 2 reused the suspect id") end

mt.macro(conn, SMFIC_MAIL, "i", "4MTEST3")
if mt.mailfrom(conn, "<sender@example.org>") ~= nil then error("mailfrom 3") end
if mt.rcptto(conn, "<rcpt@example.net>") ~= nil then error("rcptto 3") end
if mt.header(conn, "X-Test-Verdict", "REJECT refused by the miltertest plugin") ~= nil then error("header 3") end
if mt.eoh(conn) ~= nil then error("eoh 3") end
if mt.bodystring(conn, "third message\r\n") ~= nil then error("body 3") end
if mt.eom(conn) ~= nil then error("eom 3") end
if mt.getreply(conn) ~= SMFIR_REPLYCODE then error("message 3: not REPLYCODE") end
-- (the reply text is checked through Postfix: miltertest 1.x exits on MT_SMTPREPLY checks)

mt.disconnect(conn)
mt.echo("miltertest: all checks passed")
