"""DICOMweb e2e checks with dicomweb-client (PyPI) over mutual TLS.

  stow URL PKI WHO DIR              STOW-RS every *.dcm of DIR; prints the count stored
  qido URL PKI WHO KEY=VALUE...     QIDO-RS studies; prints one line per study:
                                    StudyInstanceUID PatientID
  qido-series URL PKI WHO KEY=VALUE...     QIDO-RS /series: StudyInstanceUID SeriesInstanceUID
  qido-instances URL PKI WHO KEY=VALUE...  QIDO-RS /instances: StudyInstanceUID SOPInstanceUID
                                    (study=UID as a KEY: /studies/UID/series, .../instances)
  wado-same URL PKI WHO STUDY RETRIEVED    WADO-RS the study (raw multipart): the parts must be
                                    byte-identical to the instances of RETRIEVED (grpcurl's
                                    RetrieveDicom output); prints the count
  relabel SRC DST PATIENT_ID        copies SRC's *.dcm to DST as another study (new UIDs,
                                    PATIENT_ID); prints its StudyInstanceUID
  stow-partial URL PKI WHO GOOD BAD STOW-RS GOOD whole and BAD cut short after its meta
                                    group; prints: HTTP status, the stored count, then
                                    FAILED <SOP Instance UID> <FailureReason> per failure
  foreign URL PKI OTHER WHO         a certificate of another CA (OTHER/WHO.crt): must fail
  wado-raw URL PKI WHO STUDY DIR    WADO-RS the study (raw multipart): every part must be
                                    byte-identical to a file of DIR; prints the count
  wado URL PKI WHO STUDY DIR MODE   dicomweb-client retrieve_study: MODE identical (same
                                    data sets) or deidentified (no original ID/name/UIDs)
  metadata URL PKI WHO LEVEL REF     dicomweb-client retrieve_{study,series,instance}_metadata
                                    (LEVEL study, series or instance) of the first data set
                                    of REF (a directory of *.dcm, or grpcurl's RetrieveDicom
                                    output): the answer must hold exactly REF's instances at
                                    that level, each with the same attributes as REF's file
                                    (no Pixel Data, no file meta) and the same Patient ID;
                                    prints the count, then each PatientID
  get URL PKI WHO PATH              the HTTP status (and reason) of GET PATH (DICOM JSON)
  status URL PKI WHO STUDY          the HTTP status (and reason) of WADO-RS on STUDY
  nocert URL PKI                    a client without a certificate: must fail the handshake
"""
import hashlib
import os
import sys

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session


def session(pki, who):
    s = create_session()
    s.cert = (os.path.join(pki, f"{who}.crt"), os.path.join(pki, f"{who}.key"))
    s.verify = os.path.join(pki, "ca.crt")
    # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace session.verify
    # (psf/requests#3829): without this, a host whose environment names the
    # system bundle fails to verify the dev CA's server certificate.
    s.trust_env = False
    return s


def client(url, pki, who):
    return DICOMwebClient(url=url, session=session(pki, who))


def files(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".dcm"))


def stow(url, pki, who, d):
    ds = [pydicom.dcmread(f) for f in files(d)]
    try:
        r = client(url, pki, who).store_instances(datasets=ds)
    except requests.HTTPError as e:
        print(e.response.status_code, e.response.text.strip()[:300])
        return
    print(len(r.get("ReferencedSOPSequence", [])))


def scoped(kv):
    filters = dict(a.split("=", 1) for a in kv)
    return filters.pop("study", None), filters


def qido_series(url, pki, who, *kv):
    study, filters = scoped(kv)
    for s in client(url, pki, who).search_for_series(study_instance_uid=study, search_filters=filters):
        print(s.get("0020000D", {}).get("Value", [""])[0], s.get("0020000E", {}).get("Value", [""])[0])


def qido_instances(url, pki, who, *kv):
    study, filters = scoped(kv)
    for s in client(url, pki, who).search_for_instances(study_instance_uid=study, search_filters=filters):
        print(s.get("0020000D", {}).get("Value", [""])[0], s.get("00080018", {}).get("Value", [""])[0])


def wado_same(url, pki, who, study, retrieved):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dicom_tool
    r = session(pki, who).get(f"{url}/studies/{study}",
                              headers={"Accept": 'multipart/related; type="application/dicom"'})
    r.raise_for_status()
    want = sorted(hashlib.sha256(data).hexdigest() for _, data in dicom_tool.instances(retrieved))
    got = sorted(hashlib.sha256(p).hexdigest() for p in parts(r))
    if not want or got != want:
        sys.exit(f"{len(got)} WADO-RS parts, {len(want)} RetrieveDicom instances; "
                 f"{len(set(got) & set(want))} byte-identical")
    print(len(got))


def stow_partial(url, pki, who, good, bad):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dicom_tool
    good_b = open(good, "rb").read()
    bad_b = open(bad, "rb").read()
    cut = len(bad_b) - len(dicom_tool.dataset_bytes(bad_b)) + 20
    body = b""
    for part in (good_b, bad_b[:cut]):
        body += b"--b0\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
    body += b"--b0--\r\n"
    r = session(pki, who).post(f"{url}/studies", data=body, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b0',
        "Accept": "application/dicom+json"})
    ds = r.json() if r.content else {}
    print(r.status_code)
    print(len(ds.get("00081199", {}).get("Value", [])))
    for item in ds.get("00081198", {}).get("Value", []):
        print("FAILED", item.get("00081155", {}).get("Value", ["-"])[0],
              item.get("00081197", {}).get("Value", ["-"])[0])


def relabel(src, dst, patient_id):
    from pydicom.uid import generate_uid
    os.makedirs(dst, exist_ok=True)
    study, series = generate_uid(prefix=None), generate_uid(prefix=None)
    for i, f in enumerate(files(src)):
        ds = pydicom.dcmread(f)
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.{i + 1}"
        ds.save_as(os.path.join(dst, os.path.basename(f)), enforce_file_format=True)
    print(study)


def foreign(url, pki, other, who):
    s = requests.Session()
    s.trust_env = False
    s.cert = (os.path.join(other, f"{who}.crt"), os.path.join(other, f"{who}.key"))
    s.verify = os.path.join(pki, "ca.crt")
    try:
        r = s.get(f"{url}/studies", timeout=10)
    except requests.exceptions.RequestException as e:
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            sys.exit(f"the server's certificate did not verify (not a refusal): {e}")
        print("refused:", type(e).__name__)
        return
    sys.exit(f"a certificate of another CA was answered {r.status_code}")


def qido(url, pki, who, *kv):
    filters = dict(a.split("=", 1) for a in kv)
    for s in client(url, pki, who).search_for_studies(search_filters=filters):
        uid = s.get("0020000D", {}).get("Value", [""])[0]
        pid = s.get("00100020", {}).get("Value", [""])[0]
        print(uid, pid)


def parts(resp):
    ctype = resp.headers["Content-Type"]
    b = [p.split("=", 1)[1].strip('"') for p in ctype.split(";") if p.strip().startswith("boundary=")][0]
    body = resp.content
    out = []
    for chunk in body.split(b"--" + b.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, rest = chunk.partition(b"\r\n\r\n")
        out.append(rest[:-2])
    return out


def wado_raw(url, pki, who, study, d):
    r = session(pki, who).get(f"{url}/studies/{study}",
                              headers={"Accept": 'multipart/related; type="application/dicom"'})
    r.raise_for_status()
    want = {hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files(d)}
    got = [hashlib.sha256(p).hexdigest() for p in parts(r)]
    missing = [g for g in got if g not in want]
    if missing or len(set(got)) != len(want):
        sys.exit(f"{len(got)} parts, {len(missing)} not byte-identical to a sent file")
    print(len(got))


def wado(url, pki, who, study, d, mode):
    got = client(url, pki, who).retrieve_study(study)
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files(d)}
    for ds in got:
        if mode == "identical":
            if ds.SOPInstanceUID not in sent or ds.PatientID != sent[ds.SOPInstanceUID].PatientID:
                sys.exit(f"{ds.SOPInstanceUID}: not one of the sent instances")
        else:
            orig = next(iter(sent.values()))
            if ds.SOPInstanceUID in sent or ds.get("PatientID", "") == orig.PatientID \
                    or str(ds.get("PatientName", "")) == str(orig.PatientName) and str(orig.PatientName):
                sys.exit(f"{ds.SOPInstanceUID}: identifying values left")
    print(len(got))


def reference(ref):
    """(dataset, tags) of REF's files: a directory of *.dcm, or RetrieveDicom output."""
    import io
    if os.path.isdir(ref):
        blobs = [open(f, "rb").read() for f in files(ref)]
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import dicom_tool
        blobs = [data for _, data in dicom_tool.instances(ref)]
    out = []
    for b in blobs:
        ds = pydicom.dcmread(io.BytesIO(b))
        tags = {f"{int(t):08X}" for t in ds.keys()} - {"7FE00010", "7FE00008", "7FE00009"}
        out.append((ds, tags))
    return out


def metadata(url, pki, who, level, ref):
    refs = reference(ref)
    first = refs[0][0]
    c = client(url, pki, who)
    study, series, sop = first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID
    if level == "study":
        got = c.retrieve_study_metadata(study)
        want = refs
    elif level == "series":
        got = c.retrieve_series_metadata(study, series)
        want = [r for r in refs if r[0].SeriesInstanceUID == series]
    else:
        got = [c.retrieve_instance_metadata(study, series, sop)]
        want = [r for r in refs if r[0].SOPInstanceUID == sop]
    by_sop = {r[0].SOPInstanceUID: r for r in want}
    sops = [m.get("00080018", {}).get("Value", [""])[0] for m in got]
    if sorted(sops) != sorted(by_sop):
        sys.exit(f"metadata names {sorted(sops)}, the reference {sorted(by_sop)}")
    ids = []
    for m, uid in zip(got, sops):
        ds, tags = by_sop[uid]
        if set(m) != tags:
            sys.exit(f"{uid}: attributes differ: only in metadata {sorted(set(m) - tags)}, "
                     f"only in the file {sorted(tags - set(m))}")
        pid = m.get("00100020", {}).get("Value", [""])[0]
        if pid != str(ds.get("PatientID", "")):
            sys.exit(f"{uid}: PatientID {pid!r}, the file has {ds.get('PatientID', '')!r}")
        ids.append(pid)
    print(len(got))
    for pid in ids:
        print(f"PatientID={pid}")


def get(url, pki, who, path):
    r = session(pki, who).get(f"{url}{path}", headers={"Accept": "application/dicom+json"})
    print(r.status_code, r.text.strip().replace("\n", " ")[:300])


def status(url, pki, who, study):
    r = session(pki, who).get(f"{url}/studies/{study}",
                              headers={"Accept": 'multipart/related; type="application/dicom"'})
    print(r.status_code, r.text.strip().replace("\n", " ")[:300])


def nocert(url, pki):
    s = requests.Session()
    s.trust_env = False
    try:
        s.get(f"{url}/studies", verify=os.path.join(pki, "ca.crt"), timeout=10)
    except requests.exceptions.RequestException as e:
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            sys.exit(f"the server's certificate did not verify (not a refusal): {e}")
        print("refused:", type(e).__name__)
        return
    sys.exit("a client without a certificate was answered")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"stow": stow, "qido": qido, "qido-series": qido_series, "qido-instances": qido_instances,
     "wado-raw": wado_raw, "wado": wado, "wado-same": wado_same, "stow-partial": stow_partial, "relabel": relabel,
     "status": status, "get": get, "metadata": metadata, "nocert": nocert, "foreign": foreign}[cmd](*args)
