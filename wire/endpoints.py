"""The HTTP face of the tunnel: the paths and headers both sides must agree on."""

REGISTER_PATH = "/tunnel/v1/register"  # POST a Hello frame, get a Welcome frame back
POLL_PATH = "/tunnel/v1/poll"  # GET: a streaming response of broker → connector frames
REPLY_PATH = "/tunnel/v1/reply"  # POST: a streaming body of one request's reply frames

SESSION_HEADER = "x-remotellm-session"
FRAMES_CONTENT_TYPE = "application/x-remotellm-frames"
