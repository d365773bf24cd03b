-- Wireshark / tshark dissector for teeio-emu TLP captures (teeio-device --link-capture).
--
-- The capture is pcapng with link type 147 (LINKTYPE_USER0); each packet is one
-- non-flit TLP exactly as it crossed the emulated link (vfio_user_dev/link/capture.py,
-- docs/link-internals.md), the direction in the packet's epb_flags (inbound = upstream,
-- device -> root port; outbound = downstream).  Layout as teeio/tlp/ encodes it
-- (PCIe 6.x §2.2, IDE prefix §6.33.4; big-endian on the wire):
--
--   [IDE prefix, 4 bytes, byte 0 = 0x92]  byte 1: b6:4 sub-stream, b3 P, b2 T, b1 K, b0 M
--                                         byte 2: Stream ID, byte 3: PR_Sent_Counter
--   DW0  Fmt[7:5] Type[4:0] | T9 TC T8 Attr2 | Attr[1:0] in b5:4, Length[9:8] | Length[7:0]
--   request:    DW1 Requester ID | Tag[7:0] | Last BE, First BE;  then Address (32 or 64 bit)
--   completion: DW1 Completer ID | Status[7:5] BCM[4] ByteCount[11:8] | ByteCount[7:0]
--               DW2 Requester ID | Tag[7:0] | Lower Address[6:0]
--   then the payload (for IDE TLPs: ciphertext), then the 12-byte IDE MAC when protected
--   and M is set.  With IDE aggregation (§6.33.6) up to 8 TLPs of one sub-stream share one
--   MAC: the unit's last TLP has M set and carries it, the others have M clear and no MAC.
--
-- Use:  tshark -X lua_script:tools/teeio_tlp.lua -r link.pcap -V
--       wireshark -X lua_script:tools/teeio_tlp.lua link.pcap
-- (or copy this file into Wireshark's personal plugins folder).  Display filters:
-- teeio_tlp.type, teeio_tlp.rid, teeio_tlp.addr, teeio_tlp.ide.stream_id, teeio_tlp.ide.t ...

local p = Proto("teeio_tlp", "teeio-emu PCIe TLP")

local TYPES = {
    [0x00] = "MRd32", [0x20] = "MRd64", [0x40] = "MWr32", [0x60] = "MWr64",
    [0x0A] = "Cpl", [0x4A] = "CplD",
}
local SUBSTREAMS = { [0] = "PR (posted)", [1] = "NPR (non-posted)", [2] = "CPL (completions)" }
local CPL_STATUS = { [0] = "SC", [1] = "UR", [2] = "CRS", [4] = "CA" }
local MAC_LEN = 12
local band, shr = bit.band, bit.rshift     -- Wireshark's Lua may be 5.1/5.2: no operators

local f = {
    ide = ProtoField.bytes("teeio_tlp.ide", "IDE prefix"),
    substream = ProtoField.uint8("teeio_tlp.ide.substream", "Sub-stream", base.DEC, SUBSTREAMS),
    pbit = ProtoField.bool("teeio_tlp.ide.p", "P (PCRC)"),
    tbit = ProtoField.bool("teeio_tlp.ide.t", "T (TEE-originated)"),
    keyset = ProtoField.uint8("teeio_tlp.ide.key_set", "K (key set)"),
    mbit = ProtoField.bool("teeio_tlp.ide.m", "M (MAC follows)"),
    stream_id = ProtoField.uint8("teeio_tlp.ide.stream_id", "Stream ID"),
    pr_sent = ProtoField.uint8("teeio_tlp.ide.pr_sent_counter", "PR_Sent_Counter"),
    fmt_type = ProtoField.uint8("teeio_tlp.type", "Fmt/Type", base.HEX, TYPES),
    tc = ProtoField.uint8("teeio_tlp.tc", "TC"),
    attr = ProtoField.uint8("teeio_tlp.attr", "Attr", base.HEX),
    ep = ProtoField.bool("teeio_tlp.ep", "EP (poisoned)"),
    length = ProtoField.uint16("teeio_tlp.length", "Length (DW)"),
    rid = ProtoField.uint16("teeio_tlp.rid", "Requester ID", base.HEX),
    tag = ProtoField.uint16("teeio_tlp.tag", "Tag"),
    last_be = ProtoField.uint8("teeio_tlp.last_be", "Last DW BE", base.HEX),
    first_be = ProtoField.uint8("teeio_tlp.first_be", "First DW BE", base.HEX),
    addr = ProtoField.uint64("teeio_tlp.addr", "Address", base.HEX),
    cid = ProtoField.uint16("teeio_tlp.cid", "Completer ID", base.HEX),
    status = ProtoField.uint8("teeio_tlp.status", "Completion Status", base.DEC, CPL_STATUS),
    bcm = ProtoField.bool("teeio_tlp.bcm", "BCM"),
    byte_count = ProtoField.uint16("teeio_tlp.byte_count", "Byte Count"),
    lower_addr = ProtoField.uint8("teeio_tlp.lower_addr", "Lower Address", base.HEX),
    payload = ProtoField.bytes("teeio_tlp.payload", "Payload"),
    mac = ProtoField.bytes("teeio_tlp.ide.mac", "IDE MAC"),
}
p.fields = f

local function bdf(v)
    return string.format("%02x:%02x.%d", shr(v, 8), band(shr(v, 3), 0x1F), band(v, 7))
end

function p.dissector(tvb, pinfo, tree)
    local n = tvb:len()
    if n < 4 then return 0 end
    pinfo.cols.protocol = "TLP"
    local t = tree:add(p, tvb(), "teeio-emu PCIe TLP")
    local off = 0
    local protected = false
    local has_mac = false
    local info = {}
    if tvb(0, 1):uint() == 0x92 then
        protected = true
        local b1 = tvb(1, 1):uint()
        local pt = t:add(f.ide, tvb(0, 4))
        pt:add(f.substream, tvb(1, 1), band(shr(b1, 4), 7))
        pt:add(f.pbit, tvb(1, 1), band(b1, 8) ~= 0)
        pt:add(f.tbit, tvb(1, 1), band(b1, 4) ~= 0)
        pt:add(f.keyset, tvb(1, 1), band(shr(b1, 1), 1))
        pt:add(f.mbit, tvb(1, 1), band(b1, 1) ~= 0)
        has_mac = band(b1, 1) ~= 0
        pt:add(f.stream_id, tvb(2, 1))
        pt:add(f.pr_sent, tvb(3, 1))
        info[#info + 1] = string.format("IDE stream %d K%d T=%d %s%s", tvb(2, 1):uint(),
                                        band(shr(b1, 1), 1), band(shr(b1, 2), 1),
                                        (SUBSTREAMS[band(shr(b1, 4), 7)] or "?"):match("^%S+"),
                                        has_mac and "" or " (aggregated, MAC later)")
        off = 4
    end
    if n < off + 12 then
        t:add_expert_info(PI_MALFORMED, PI_ERROR, "truncated TLP header")
        return n
    end
    local ft = tvb(off, 1):uint()
    local name = TYPES[ft] or string.format("type 0x%02x", ft)
    local b1, b2 = tvb(off + 1, 1):uint(), tvb(off + 2, 1):uint()
    local len = band(b2, 3) * 256 + tvb(off + 3, 1):uint()
    if len == 0 then len = 1024 end
    local tag_hi = band(shr(b1, 7), 1) * 512 + band(shr(b1, 3), 1) * 256
    t:add(f.fmt_type, tvb(off, 1))
    t:add(f.tc, tvb(off + 1, 1), band(shr(b1, 4), 7))
    t:add(f.attr, tvb(off + 1, 2), band(shr(b1, 2), 1) * 4 + band(shr(b2, 4), 3))
    t:add(f.ep, tvb(off + 2, 1), band(b2, 0x40) ~= 0)
    t:add(f.length, tvb(off + 2, 2), len)
    local hdr = band(ft, 0x20) ~= 0 and 16 or 12
    if n < off + hdr then
        t:add_expert_info(PI_MALFORMED, PI_ERROR, "truncated TLP header")
        return n
    end
    local is_cpl = band(ft, 0x1F) == 0x0A
    if is_cpl then
        local rid = tvb(off + 8, 2):uint()
        local tag = tag_hi + tvb(off + 10, 1):uint()
        local s = tvb(off + 6, 1):uint()
        t:add(f.cid, tvb(off + 4, 2))
        t:add(f.status, tvb(off + 6, 1), shr(s, 5))
        t:add(f.bcm, tvb(off + 6, 1), band(s, 0x10) ~= 0)
        local bc = band(s, 0xF) * 256 + tvb(off + 7, 1):uint()
        if bc == 0 then bc = 4096 end
        t:add(f.byte_count, tvb(off + 6, 2), bc)
        t:add(f.rid, tvb(off + 8, 2))
        t:add(f.tag, tvb(off + 10, 1), tag)
        t:add(f.lower_addr, tvb(off + 11, 1), band(tvb(off + 11, 1):uint(), 0x7F))
        info[#info + 1] = string.format("%s %s rid=%s tag=%d bc=%d", name,
                                        CPL_STATUS[shr(s, 5)] or "?", bdf(rid), tag, bc)
    else
        local rid = tvb(off + 4, 2):uint()
        local tag = tag_hi + tvb(off + 6, 1):uint()
        local be = tvb(off + 7, 1):uint()
        t:add(f.rid, tvb(off + 4, 2))
        t:add(f.tag, tvb(off + 6, 1), tag)
        t:add(f.last_be, tvb(off + 7, 1), shr(be, 4))
        t:add(f.first_be, tvb(off + 7, 1), band(be, 0xF))
        local addr
        if hdr == 16 then
            addr = tvb(off + 8, 8):uint64()
            t:add(f.addr, tvb(off + 8, 8), addr)
        else
            addr = UInt64(tvb(off + 8, 4):uint())
            t:add(f.addr, tvb(off + 8, 4), addr)
        end
        info[#info + 1] = string.format("%s rid=%s tag=%d addr=0x%s len=%dDW", name, bdf(rid),
                                        tag, addr:tohex():gsub("^0+(%x)", "%1"), len)
    end
    local body = off + hdr
    -- Only a TLP with M set carries the MAC; one of an aggregated unit before its last
    -- carries none (§6.33.6), its ciphertext runs to the end.
    local tail = has_mac and MAC_LEN or 0
    if n - tail > body then
        t:add(f.payload, tvb(body, n - tail - body))
    end
    if has_mac and n >= body + MAC_LEN then
        t:add(f.mac, tvb(n - MAC_LEN, MAC_LEN))
    elseif has_mac then
        t:add_expert_info(PI_MALFORMED, PI_ERROR, "M is set but the TLP is too short for its MAC")
    end
    local dir = ""
    if pinfo.p2p_dir == P2P_DIR_RECV then dir = "up   " elseif pinfo.p2p_dir == P2P_DIR_SENT then dir = "down " end
    pinfo.cols.info = dir .. table.concat(info, " ")
    return n
end

DissectorTable.get("wtap_encap"):add(wtap.USER0, p)
