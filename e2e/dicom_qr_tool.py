"""Helpers for e2e/dicom_qr.sh (the .venv python: pynetdicom, pydicom).

  cget HOST PORT AET STUDY_UID SRC_DIR MODE COUNT
      C-GET (Study Root, STUDY level; STUDY_UID "FIND": the one UID a
      C-FIND as AET answers) with pynetdicom, the CT storage
      context offered with the SCP role; every data set is kept exactly as
      it arrived. MODE "identical": each equals one source file's data set
      byte for byte; "deidentified": no patient identity in the bytes,
      (0012,0062) = YES, one (mapped) study UID. COUNT: instances expected.
      Prints the final status and the sub-operation counts.
  cget-status HOST PORT AET STUDY_UID
      C-GET; prints the final status (hex) and its Error Comment.
  datasets-equal SRC_DIR DIR
      every Part 10 file in DIR holds, byte for byte, the data set of one
      source file (storescp +B writes data sets exactly as received).
"""
import io
import os
import ssl
import sys

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from pydicom.uid import ExplicitVRLittleEndian

sys.path.insert(0, os.path.dirname(__file__))
from dicom_tool import PATIENT_ID, PATIENT_NAME, STUDY_UID, dataset_bytes  # noqa: E402


def sources(src_dir):
    return {dataset_bytes(open(os.path.join(src_dir, f), "rb").read())
            for f in os.listdir(src_dir) if f.endswith(".dcm")}


def tls_args():
    """DICOM TLS when E2E_DICOM_TLS is "CA:CERT:KEY" (the client
    certificate is the peer's identity), else None (plain DICOM)."""
    spec = os.environ.get("E2E_DICOM_TLS")
    if not spec:
        return None
    ca, cert, key = spec.split(":")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    return (ctx, "localhost")


def c_get(host, port, aet, study_uid):
    received = []

    def on_store(event):
        received.append((event.request.DataSet.getvalue(), event.dataset))
        return 0x0000

    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(host, int(port), ae_title="TESSERA",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)],
                         tls_args=tls_args())
    if not assoc.is_established:
        raise SystemExit("association not established")
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    last = None
    for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
        if status:
            last = status
    assoc.release()
    if last is None:
        raise SystemExit("no C-GET response")
    return last, received


def cstore(host, port, aet, src_dir):
    """C-STORE every file of src_dir (CT, Explicit VR LE), over TLS with
    E2E_DICOM_TLS."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(host, int(port), ae_title="TESSERA", tls_args=tls_args())
    if not assoc.is_established:
        raise SystemExit("association not established")
    n = 0
    for f in sorted(os.listdir(src_dir)):
        status = assoc.send_c_store(pydicom.dcmread(os.path.join(src_dir, f)))
        if not status or status.Status != 0:
            raise SystemExit(f"{f}: {status}")
        n += 1
    assoc.release()
    print(f"{n} stored")


def find_study_uids(host, port, aet):
    """The Study Instance UIDs a STUDY-level C-FIND answers `aet`."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(host, int(port), ae_title="TESSERA")
    if not assoc.is_established:
        raise SystemExit("association not established")
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    uids = []
    for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
        if status and status.Status == 0xFF00 and ident is not None:
            uids.append(str(ident.StudyInstanceUID))
    assoc.release()
    return uids


def cget(host, port, aet, study_uid, src_dir, mode, count):
    if study_uid == "FIND":
        uids = find_study_uids(host, port, aet)
        if len(uids) != 1 or uids[0] == STUDY_UID:
            raise SystemExit(f"C-FIND answered {uids}")
        study_uid = uids[0]
    status, received = c_get(host, port, aet, study_uid)
    counts = [int(getattr(status, n, 0) or 0) for n in (
        "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations", "NumberOfWarningSuboperations")]
    print(f"status 0x{status.Status:04X} completed/failed/warning {counts}")
    if status.Status != 0 or counts != [int(count), 0, 0] or len(received) != int(count):
        raise SystemExit(f"{len(received)} received, expected {count}")
    sent = sources(src_dir)
    uids = set()
    for raw, ds in received:
        if mode == "identical":
            if raw not in sent:
                raise SystemExit(f"{ds.SOPInstanceUID}: data set differs from every source file")
        elif mode == "deidentified":
            for secret in (PATIENT_NAME, "Tesserae", PATIENT_ID, STUDY_UID):
                if secret.encode() in raw:
                    raise SystemExit(f"{secret!r} in a de-identified data set")
            if ds.PatientIdentityRemoved != "YES":
                raise SystemExit("(0012,0062) is not YES")
            uids.add(ds.StudyInstanceUID)
        else:
            raise SystemExit(f"unknown mode {mode}")
    if mode == "deidentified" and (len(uids) != 1 or STUDY_UID in uids):
        raise SystemExit(f"study UIDs {uids}")
    print(f"{len(received)} instances ok ({mode})")


def cget_status(host, port, aet, study_uid):
    status, received = c_get(host, port, aet, study_uid)
    comment = getattr(status, "ErrorComment", "") or ""
    print(f"0x{status.Status:04X} {len(received)} {comment}")


def datasets_equal(src_dir, out_dir):
    sent = sources(src_dir)
    files = [f for f in os.listdir(out_dir) if not f.startswith(".")]
    if not files:
        raise SystemExit(f"nothing in {out_dir}")
    for f in files:
        data = open(os.path.join(out_dir, f), "rb").read()
        if dataset_bytes(data) not in sent:
            raise SystemExit(f"{f}: data set differs from every source file")
    print(f"{len(files)} files, data sets byte-identical")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"cget": cget, "cget-status": cget_status, "datasets-equal": datasets_equal,
     "cstore": cstore}[cmd](*args)
